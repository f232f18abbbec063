"""Checks for chapter 05, the sparsely-gated mixture of experts (Shazeer et al. 2017).

Conventions (stated in the notebook too): tokens are the rows of a matrix ``x`` of shape
``(N, d_model)``; gate matrices are used as ``x @ W_g`` with ``W_g`` of shape ``(d_model, n_experts)``;
gate logits and gates have shape ``(N, n_experts)``. Noisy gating is random, so the checks pass the
standard-normal noise in as a tensor: ``H(x) = x @ W_g + noise * softplus(x @ W_noise)``.

The references are written independently of the notebook's solutions: top-k through
``torch.topk``, the normal CDF through ``torch.distributions.Normal``, the load's "k-th largest
excluding expert i" by literally deleting column i, and the MoE layer as a *dense* sum over every
expert weighted by its gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autograders.engine.core import EXACT, Check, CheckSet, Mistake, Tolerance
from autograders.harness import mixture_of_experts as H

CHAPTER = H.CHAPTER

GATES_TOL = Tolerance(1e-5, 1e-4, "float32 matrix products and a softmax; a different but correct order "
                                  "of operations moves gates by ~1e-6")
SCALAR_TOL = Tolerance(1e-6, 1e-4, "a float32 ratio of sums over a few dozen values; relative error "
                                   "~1e-6 from summation order, and an epsilon of 1e-10 in a "
                                   "denominator is allowed")
LOAD_TOL = Tolerance(1e-4, 1e-4, "sums of up to 32 float32 normal-CDF values (erf), ~1e-6 each")
MOE_TOL = Tolerance(1e-5, 1e-4, "float32 expert FFNs combined in another order than the dense reference "
                                "(index_add vs a dense sum); token counts are integers and match exactly")


# ---------------------------------------------------------------------------------------------
# references (independent of the notebook)

def _topk_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    idx = torch.topk(logits, k, dim=-1).indices
    return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)


def _keep_top_k_ref(logits: torch.Tensor, k: int) -> torch.Tensor:
    return logits.masked_fill(~_topk_mask(logits, k), float("-inf"))


def _noisy_logits(x, W_g, W_noise, noise):
    clean = x @ W_g
    std = F.softplus(x @ W_noise)
    noisy = clean if noise is None else clean + noise * std
    return clean, noisy, std


def _gates_ref(x, W_g, W_noise, noise, k):
    _, noisy, _ = _noisy_logits(x, W_g, W_noise, noise)
    return torch.softmax(_keep_top_k_ref(noisy, k), dim=-1)


def _cv_squared_ref(values: torch.Tensor) -> torch.Tensor:
    v = values.double()
    return (v.var(unbiased=False) / v.mean() ** 2).float()


def _load_ref(clean, noisy, std, k):
    n, n_experts = noisy.shape
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
                                        torch.tensor(1.0, dtype=torch.float64))
    load = torch.zeros(n_experts, dtype=torch.float64)
    for i in range(n_experts):
        others = torch.cat([noisy[:, :i], noisy[:, i + 1:]], dim=1)
        if k > others.shape[1]:  # k == n_experts: expert i is always among the top k
            load[i] = n
            continue
        threshold = torch.topk(others, k, dim=1).values[:, -1]
        load[i] = normal.cdf(((clean[:, i] - threshold) / std[:, i]).double()).sum()
    return load.float()


# The given versions of the earlier exercises, as later ones get them while they are checked.

def _given_keep_top_k(logits, k):
    return _keep_top_k_ref(logits, k)


def _given_cv_squared(values):
    return _cv_squared_ref(values)


def _given_importance_loss(gates, w_importance=1.0):
    return w_importance * _cv_squared_ref(gates.sum(0))


def _given_smooth_load(clean_logits, noisy_logits, noise_std, k):
    return _load_ref(clean_logits, noisy_logits, noise_std, k)


# ---------------------------------------------------------------------------------------------
# 1. KeepTopK

def _ktk_bottom(logits, k):
    idx = torch.topk(logits, k, dim=-1, largest=False).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)
    return logits.masked_fill(~keep, float("-inf"))


def _ktk_zero(logits, k):
    return logits.masked_fill(~_topk_mask(logits, k), 0.0)


def _ktk_dim0(logits, k):
    if logits.ndim < 2 or logits.shape[0] < k:
        raise ValueError("not applicable")
    return _keep_top_k_ref(logits.transpose(0, -1), k).transpose(0, -1)


def _ktk_strict(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(~(logits > kth), float("-inf"))


def _ktk_softmax(logits, k):
    return torch.softmax(_keep_top_k_ref(logits, k), dim=-1)


KEEP_TOP_K = Check(
    H.KEEP_TOP_K,
    reference=lambda inputs: _keep_top_k_ref(inputs["logits"], inputs["k"]),
    tolerance=EXACT,
    mistakes=(
        Mistake("smallest k", _ktk_bottom,
                "your result keeps the k SMALLEST logits: keep the k largest of each row (torch.topk)."),
        Mistake("zero instead of -inf", _ktk_zero,
                "your result sets the dropped logits to 0: softmax would still give them weight exp(0). "
                "Set them to -inf."),
        Mistake("wrong axis", _ktk_dim0,
                "your result keeps the top k along axis 0 (over tokens): keep the top k of each token's "
                "logits, along the last axis (experts)."),
        Mistake("strictly greater than the k-th", _ktk_strict,
                "your result keeps only k-1 entries: the k-th largest logit itself must be kept "
                "(compare with >=, or scatter the indices from torch.topk)."),
        Mistake("softmax applied", _ktk_softmax,
                "your result is already a softmax: keep_top_k returns logits (the kept ones unchanged); "
                "the softmax comes afterwards in the gate."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 2. noisy top-k gating


def _gating_no_softplus(x, W_g, W_noise, noise, k):
    logits = x @ W_g + (0 if noise is None else noise * (x @ W_noise))
    return torch.softmax(_keep_top_k_ref(logits, k), dim=-1)


def _gating_unscaled_noise(x, W_g, W_noise, noise, k):
    logits = x @ W_g + (0 if noise is None else noise)
    return torch.softmax(_keep_top_k_ref(logits, k), dim=-1)


def _gating_dense(x, W_g, W_noise, noise, k):
    _, noisy, _ = _noisy_logits(x, W_g, W_noise, noise)
    return torch.softmax(noisy, dim=-1)


def _gating_softmax_then_zero(x, W_g, W_noise, noise, k):
    _, noisy, _ = _noisy_logits(x, W_g, W_noise, noise)
    p = torch.softmax(noisy, dim=-1)
    return p * _topk_mask(noisy, k)


def _gating_clean_selection(x, W_g, W_noise, noise, k):
    clean, noisy, _ = _noisy_logits(x, W_g, W_noise, noise)
    return torch.softmax(noisy.masked_fill(~_topk_mask(clean, k), float("-inf")), dim=-1)


def _gating_exp_scale(x, W_g, W_noise, noise, k):
    logits = x @ W_g + (0 if noise is None else noise * torch.exp(x @ W_noise))
    return torch.softmax(_keep_top_k_ref(logits, k), dim=-1)


GATING = Check(
    H.GATING,
    reference=lambda inputs: _gates_ref(**inputs),
    tolerance=GATES_TOL,
    mistakes=(
        Mistake("no softplus", _gating_no_softplus,
                "your gates match noise * (x @ W_noise): the noise scale must be softplus(x @ W_noise), "
                "which is always positive."),
        Mistake("unscaled noise", _gating_unscaled_noise,
                "your gates match x @ W_g + noise: the noise is multiplied by its learned scale "
                "softplus(x @ W_noise)."),
        Mistake("exp instead of softplus", _gating_exp_scale,
                "your gates match a noise scale of exp(x @ W_noise): the paper uses softplus(x @ W_noise)."),
        Mistake("no KeepTopK", _gating_dense,
                "your gates match a softmax over all experts: apply keep_top_k (k of them survive) "
                "before the softmax."),
        Mistake("softmax, then zero", _gating_softmax_then_zero,
                "your gates match a softmax over all experts with the others zeroed afterwards: those "
                "gates no longer sum to 1. Set the logits to -inf with keep_top_k BEFORE the softmax."),
        Mistake("top k of the clean logits", _gating_clean_selection,
                "your gates pick the top k from the clean logits x @ W_g: choose them from the noisy "
                "logits H(x), so the noise can change which experts are chosen."),
    ),
    describe_inputs=lambda i: (f"x: {tuple(i['x'].shape)}, W_g: {tuple(i['W_g'].shape)}, "
                               f"noise: {'None' if i['noise'] is None else tuple(i['noise'].shape)}, k={i['k']}"),
    given={"keep_top_k": _given_keep_top_k},
)


# ---------------------------------------------------------------------------------------------
# 3. the balancing loss: CV^2 and the importance loss

def _cv_var_bessel(values):
    return values.var() / values.mean() ** 2


def _cv_not_squared(values):
    return values.std(unbiased=False) / values.mean()


def _cv_no_mean(values):
    return values.var(unbiased=False)


def _cv_mean_not_squared(values):
    return values.var(unbiased=False) / values.mean()


CV_SQUARED = Check(
    H.CV_SQUARED,
    reference=lambda inputs: _cv_squared_ref(inputs["values"]).reshape(1),  # the task passes one number as 1 element
    tolerance=SCALAR_TOL,
    mistakes=(
        Mistake("Bessel's correction", _cv_var_bessel,
                "your result divides the variance by n-1 (torch.var's default): use the population "
                "variance, var(unbiased=False), the mean of squared deviations."),
        Mistake("not squared", _cv_not_squared,
                "your result is the coefficient of variation std/mean itself: the loss uses its square, "
                "var/mean^2."),
        Mistake("variance only", _cv_no_mean,
                "your result is the variance: divide by the squared mean, so the loss does not depend on "
                "the batch size or the scale of the values."),
        Mistake("divided by the mean", _cv_mean_not_squared,
                "your result is var/mean: CV^2 is var/mean^2."),
    ),
)


def _importance_ref(inputs):
    return inputs["w_importance"] * _cv_squared_ref(inputs["gates"].sum(0))


def _imp_per_token(gates, w_importance=1.0):
    return w_importance * _cv_squared_ref(gates.sum(-1))


def _imp_counts(gates, w_importance=1.0):
    return w_importance * _cv_squared_ref((gates > 0).float().sum(0))


def _imp_no_weight(gates, w_importance=1.0):
    return _cv_squared_ref(gates.sum(0))


def _imp_bessel(gates, w_importance=1.0):
    return w_importance * _cv_var_bessel(gates.sum(0))


def _imp_not_squared(gates, w_importance=1.0):
    return w_importance * _cv_not_squared(gates.sum(0))


IMPORTANCE = Check(
    H.IMPORTANCE,
    reference=lambda inputs: _importance_ref(inputs).reshape(1),
    tolerance=SCALAR_TOL,
    mistakes=(
        Mistake("summed per token", _imp_per_token,
                "your loss uses the sum of each token's gates (always 1): importance is the sum over "
                "the batch (axis 0), one value per expert."),
        Mistake("token counts", _imp_counts,
                "your loss counts the tokens sent to each expert: importance sums the gate VALUES "
                "(differentiable); a count has no gradient."),
        Mistake("no weight", _imp_no_weight,
                "your loss is not multiplied by w_importance."),
        Mistake("Bessel's correction", _imp_bessel,
                "your loss uses the variance with n-1 in the denominator: use the population variance "
                "(unbiased=False)."),
        Mistake("not squared", _imp_not_squared,
                "your loss uses CV = std/mean: the importance loss is w_importance * CV^2."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 4. the smooth load estimator


def _load_ref_inputs(inputs):
    return _load_ref(inputs["clean_logits"], inputs["noisy_logits"], inputs["noise_std"], inputs["k"])


def _phi(z):
    return 0.5 * (1 + torch.erf(z / 2 ** 0.5))


def _load_with_self(clean_logits, noisy_logits, noise_std, k):
    kth = torch.topk(noisy_logits, k, dim=-1).values[:, -1:]
    return _phi((clean_logits - kth) / noise_std).sum(0)


def _threshold_excluding(noisy_logits, k):
    n_experts = noisy_logits.shape[-1]
    if k >= n_experts:
        return torch.full_like(noisy_logits, float("-inf"))
    top = torch.topk(noisy_logits, k + 1, dim=-1).values
    in_top = noisy_logits >= top[:, k - 1:k]
    return torch.where(in_top, top[:, k:k + 1], top[:, k - 1:k])


def _load_noisy_numerator(clean_logits, noisy_logits, noise_std, k):
    return _phi((noisy_logits - _threshold_excluding(noisy_logits, k)) / noise_std).sum(0)


def _load_no_std(clean_logits, noisy_logits, noise_std, k):
    return _phi(clean_logits - _threshold_excluding(noisy_logits, k)).sum(0)


def _load_counts(clean_logits, noisy_logits, noise_std, k):
    return _topk_mask(noisy_logits, k).float().sum(0)


def _load_mean(clean_logits, noisy_logits, noise_std, k):
    return _phi((clean_logits - _threshold_excluding(noisy_logits, k)) / noise_std).mean(0)


def _load_sigmoid(clean_logits, noisy_logits, noise_std, k):
    return torch.sigmoid((clean_logits - _threshold_excluding(noisy_logits, k)) / noise_std).sum(0)


LOAD = Check(
    H.LOAD,
    reference=_load_ref_inputs,
    tolerance=LOAD_TOL,
    mistakes=(
        Mistake("threshold includes the expert itself", _load_with_self,
                "your load compares every expert with the k-th largest noisy logit of ALL experts: "
                "exclude expert i itself, so for an expert inside the top k the threshold is the "
                "(k+1)-th largest."),
        Mistake("noisy logits in the numerator", _load_noisy_numerator,
                "your load uses the noisy logit of expert i: P(x, i) asks how likely expert i is chosen "
                "when ITS noise is drawn again, so start from the clean logit x @ W_g."),
        Mistake("not divided by the noise scale", _load_no_std,
                "your load does not divide by the noise scale softplus(x @ W_noise): the probability is "
                "Phi((clean_i - threshold) / noise_std_i)."),
        Mistake("hard counts", _load_counts,
                "your load counts the tokens sent to each expert: that count has no gradient. Sum the "
                "probabilities P(x, i) instead."),
        Mistake("mean over tokens", _load_mean,
                "your load averages over the tokens: Load_i is the SUM of P(x, i) over the batch."),
        Mistake("sigmoid instead of the normal CDF", _load_sigmoid,
                "your load uses a sigmoid: the noise is Gaussian, so use the standard normal CDF "
                "(torch.special.ndtr or 0.5 * (1 + erf(z / sqrt(2))))."),
    ),
    describe_inputs=lambda i: f"logits: {tuple(i['noisy_logits'].shape)}, k={i['k']}",
)


# ---------------------------------------------------------------------------------------------
# 5. the MoE layer


def _expert_ref(i, e, x):
    hidden = F.relu(F.linear(x, i["fc1_weight"][e], i["fc1_bias"][e]))
    return F.linear(hidden, i["fc2_weight"][e], i["fc2_bias"][e])


def _moe_ref(inputs):
    i = inputs
    clean, noisy, std = _noisy_logits(i["x"], i["w_gate"], i["w_noise"], i["noise"])
    gates = torch.softmax(_keep_top_k_ref(noisy, i["k"]), dim=-1)
    # The dense mixture: every expert on every token, weighted by its gate (0 for unchosen experts).
    y = sum(gates[:, e:e + 1] * _expert_ref(i, e, i["x"]) for e in range(i["n_experts"]))
    aux = (i["w_importance"] * _cv_squared_ref(gates.sum(0))
           + i["w_load"] * _cv_squared_ref(_load_ref(clean, noisy, std, i["k"])))
    counts = _topk_mask(noisy, i["k"]).float().sum(0)
    return y, aux.reshape(1), counts


class _RefExpert(nn.Module):
    def __init__(self, d_model, d_hidden):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_model)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class _MoEBase(nn.Module):
    """A correct sparse MoE; the mistakes below change one step each."""

    use_noise = True
    load_term = True

    def __init__(self, d_model, d_hidden, n_experts, k, w_importance=0.0, w_load=0.0):
        super().__init__()
        self.n_experts, self.k = n_experts, k
        self.w_importance, self.w_load = w_importance, w_load
        self.experts = nn.ModuleList(_RefExpert(d_model, d_hidden) for _ in range(n_experts))
        self.w_gate = nn.Parameter(torch.zeros(d_model, n_experts))
        self.w_noise = nn.Parameter(torch.zeros(d_model, n_experts))

    def gates(self, x, noise):
        clean, noisy, std = _noisy_logits(x, self.w_gate, self.w_noise, noise if self.use_noise else None)
        return clean, noisy, std, torch.softmax(_keep_top_k_ref(noisy, self.k), dim=-1)

    def combine(self, x, gates):
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = torch.nonzero(gates[:, e] > 0).squeeze(-1)
            if rows.numel():
                y = y.index_add(0, rows, gates[rows, e:e + 1] * expert(x[rows]))
        return y

    def aux(self, clean, noisy, std, gates):
        loss = self.w_importance * _cv_squared_ref(gates.sum(0))
        if self.load_term:
            loss = loss + self.w_load * _cv_squared_ref(_load_ref(clean, noisy, std, self.k))
        return loss

    def forward(self, x, noise=None):
        clean, noisy, std, gates = self.gates(x, noise)
        return self.combine(x, gates), self.aux(clean, noisy, std, gates)


class _MoEDense(_MoEBase):
    def forward(self, x, noise=None):
        clean, noisy, std, gates = self.gates(x, noise)
        dense = torch.softmax(noisy, dim=-1)
        y = sum(dense[:, e:e + 1] * expert(x) for e, expert in enumerate(self.experts))
        return y, self.aux(clean, noisy, std, gates)


class _MoEEveryToken(_MoEBase):
    def combine(self, x, gates):
        return sum(gates[:, e:e + 1] * expert(x) for e, expert in enumerate(self.experts))


class _MoEUnweighted(_MoEBase):
    def combine(self, x, gates):
        return super().combine(x, (gates > 0).float())


class _MoEExpertsNotCalled(_MoEBase):
    def combine(self, x, gates):
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = torch.nonzero(gates[:, e] > 0).squeeze(-1)
            y = y.index_add(0, rows, gates[rows, e:e + 1] * expert.fc2(F.relu(expert.fc1(x[rows]))))
        return y


class _MoENoNoise(_MoEBase):
    use_noise = False


class _MoEImportanceOnly(_MoEBase):
    load_term = False


MOE = Check(
    H.MOE,
    reference=_moe_ref,
    tolerance=MOE_TOL,
    mistakes=(
        Mistake("dense mixture", _MoEDense,
                "your output matches a softmax over ALL experts: combine only the k experts that "
                "keep_top_k keeps, with the gates from noisy_top_k_gating."),
        Mistake("every expert on every token", _MoEEveryToken,
                "the output is right, but every expert ran on every token: that is not conditional "
                "computation. Call self.experts[i] only on the rows of x whose gate for expert i is "
                "non-zero, and add its gated output back to those rows (index_add)."),
        Mistake("experts not called", _MoEExpertsNotCalled,
                "the output is right, but the checks saw no call of self.experts[i](...): call each "
                "expert module on its rows (the checks count the rows each expert is called on) instead "
                "of using its layers' weights directly."),
        Mistake("unweighted sum", _MoEUnweighted,
                "your output adds the chosen experts' outputs without weighting them: multiply expert "
                "i's output by the token's gate G(x)_i."),
        Mistake("noise ignored", _MoENoNoise,
                "your result matches gating without the noise: add noise * softplus(x @ w_noise) to the "
                "gate logits when `noise` is given."),
        Mistake("importance loss only", _MoEImportanceOnly,
                "your balancing loss has only the importance term: add w_load * cv_squared(load), with "
                "the load from smooth_load."),
    ),
    describe_inputs=lambda i: (f"x: {tuple(i['x'].shape)}, d_hidden={i['d_hidden']}, "
                               f"n_experts={i['n_experts']}, k={i['k']}, "
                               f"noise={'None' if i['noise'] is None else 'given'}, "
                               f"w_importance={i['w_importance']}, w_load={i['w_load']}"),
    given={"keep_top_k": _given_keep_top_k, "cv_squared": _given_cv_squared,
           "importance_loss": _given_importance_loss, "smooth_load": _given_smooth_load},
)


CHECKS = CheckSet(CHAPTER, [KEEP_TOP_K, GATING, CV_SQUARED, IMPORTANCE, LOAD, MOE])
check = CHECKS.check
