"""Chapter 05: the solution passes every check; plausible wrong answers and the stub are rejected."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autograders import mixture_of_experts as ag
from checks_support import assert_graded_on_its_own, assert_accepts, assert_rejects
from notebook_code import load_solutions, not_implemented

sol = load_solutions(ag.CHAPTER)  # includes the notebook's given Expert class


def test_every_exercise_has_a_check():
    assert set(ag.CHECKS.checks) == {"keep_top_k", "noisy_top_k_gating", "cv_squared", "importance_loss",
                                     "smooth_load", "MoE"}


@pytest.mark.parametrize("name", list(ag.CHECKS.checks))
def test_solution_passes(name):
    assert_accepts(ag.CHECKS, name, getattr(sol, name))


@pytest.mark.parametrize("name", ["keep_top_k", "noisy_top_k_gating", "cv_squared", "importance_loss",
                                  "smooth_load"])
def test_stub_fails(name):
    text = assert_rejects(ag.CHECKS, name, not_implemented)
    assert "not implemented yet" in text


def test_stub_module_fails():
    class Stub(sol.MoE):
        def forward(self, x, noise=None):
            raise NotImplementedError()
    assert "not implemented yet" in assert_rejects(ag.CHECKS, "MoE", Stub)


# --- keep_top_k ---------------------------------------------------------------------------------

def _mask_from(logits, idx):
    return torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)


def ktk_smallest(logits, k):
    return logits.masked_fill(~_mask_from(logits, logits.topk(k, largest=False).indices), float("-inf"))


def ktk_zero(logits, k):
    return logits * _mask_from(logits, logits.topk(k).indices)


def ktk_strict(logits, k):
    kth = logits.topk(k).values[..., -1:]
    return torch.where(logits > kth, logits, torch.full_like(logits, float("-inf")))


def ktk_softmax(logits, k):
    return torch.softmax(sol.keep_top_k(logits, k), dim=-1)


def ktk_over_tokens(logits, k):
    return sol.keep_top_k(logits.transpose(0, -1), k).transpose(0, -1) if logits.ndim > 1 else logits


def ktk_large_negative(logits, k):  # -1e9 instead of -inf: the result is not -inf where it should be
    return logits.masked_fill(~_mask_from(logits, logits.topk(k).indices), -1e9)


@pytest.mark.parametrize("wrong, hint", [
    (ktk_smallest, "SMALLEST"),
    (ktk_zero, "exp(0)"),
    (ktk_strict, "only k-1"),
    (ktk_softmax, "already a softmax"),
    (ktk_over_tokens, "axis 0"),
    (ktk_large_negative, None),
])
def test_keep_top_k_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "keep_top_k", wrong, hint)


# --- noisy_top_k_gating -------------------------------------------------------------------------

def gating_no_softplus(x, W_g, W_noise, noise, k):
    logits = x @ W_g if noise is None else x @ W_g + noise * (x @ W_noise)
    return torch.softmax(sol.keep_top_k(logits, k), -1)


def gating_unscaled(x, W_g, W_noise, noise, k):
    logits = x @ W_g if noise is None else x @ W_g + noise
    return torch.softmax(sol.keep_top_k(logits, k), -1)


def gating_no_top_k(x, W_g, W_noise, noise, k):
    logits = x @ W_g if noise is None else x @ W_g + noise * F.softplus(x @ W_noise)
    return torch.softmax(logits, -1)


def gating_zero_after_softmax(x, W_g, W_noise, noise, k):
    logits = x @ W_g if noise is None else x @ W_g + noise * F.softplus(x @ W_noise)
    return torch.softmax(logits, -1) * torch.isfinite(sol.keep_top_k(logits, k))


def gating_noise_after_selection(x, W_g, W_noise, noise, k):
    logits = sol.keep_top_k(x @ W_g, k)
    if noise is not None:
        logits = logits + noise * F.softplus(x @ W_noise)
    return torch.softmax(logits, -1)


def gating_noise_ignored(x, W_g, W_noise, noise, k):
    return torch.softmax(sol.keep_top_k(x @ W_g, k), -1)


@pytest.mark.parametrize("wrong, hint", [
    (gating_no_softplus, "softplus(x @ W_noise), which is always positive"),
    (gating_unscaled, "multiplied by its learned scale"),
    (gating_no_top_k, "softmax over all experts: apply keep_top_k"),
    (gating_zero_after_softmax, "no longer sum to 1"),
    (gating_noise_after_selection, "clean logits"),
    (gating_noise_ignored, None),
])
def test_gating_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "noisy_top_k_gating", wrong, hint)


# --- cv_squared / importance_loss ---------------------------------------------------------------

@pytest.mark.parametrize("wrong, hint", [
    (lambda values: values.var() / values.mean() ** 2, "n-1"),
    (lambda values: values.std(unbiased=False) / values.mean(), "its square"),
    (lambda values: values.var(unbiased=False), "divide by the squared mean"),
    (lambda values: values.var(unbiased=False) / values.mean(), "var/mean^2"),
    (lambda values: (values.max() - values.min()) / values.mean(), None),
])
def test_cv_squared_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "cv_squared", wrong, hint)


@pytest.mark.parametrize("wrong, hint", [
    (lambda gates, w_importance=1.0: w_importance * sol.cv_squared(gates.sum(1)), "axis 0"),
    (lambda gates, w_importance=1.0: w_importance * sol.cv_squared((gates > 0).float().sum(0)), "VALUES"),
    (lambda gates, w_importance=1.0: sol.cv_squared(gates.sum(0)), "w_importance"),
    (lambda gates, w_importance=1.0: w_importance * gates.sum(0).var() / gates.sum(0).mean() ** 2, "n-1"),
    (lambda gates, w_importance=1.0: w_importance * gates.sum(0).var(unbiased=False), None),
])
def test_importance_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "importance_loss", wrong, hint)


def test_importance_accepts_a_mean_over_the_batch():
    """CV^2 does not change when every value is scaled: averaging instead of summing is also right."""
    assert_accepts(ag.CHECKS, "importance_loss",
                   lambda gates, w_importance=1.0: w_importance * sol.cv_squared(gates.mean(0)))


# --- smooth_load --------------------------------------------------------------------------------

def _threshold(noisy, k):
    top = noisy.topk(min(k + 1, noisy.shape[-1]), -1).values
    if k >= noisy.shape[-1]:
        return torch.full_like(noisy, float("-inf"))
    return torch.where(noisy >= top[:, k - 1:k], top[:, k:k + 1], top[:, k - 1:k])


def load_including_self(clean_logits, noisy_logits, noise_std, k):
    kth = noisy_logits.topk(k, -1).values[:, -1:]
    return torch.special.ndtr((clean_logits - kth) / noise_std).sum(0)


def load_noisy_numerator(clean_logits, noisy_logits, noise_std, k):
    return torch.special.ndtr((noisy_logits - _threshold(noisy_logits, k)) / noise_std).sum(0)


def load_no_std(clean_logits, noisy_logits, noise_std, k):
    return torch.special.ndtr(clean_logits - _threshold(noisy_logits, k)).sum(0)


def load_counts(clean_logits, noisy_logits, noise_std, k):
    return torch.isfinite(sol.keep_top_k(noisy_logits, k)).float().sum(0)


def load_mean(clean_logits, noisy_logits, noise_std, k):
    return torch.special.ndtr((clean_logits - _threshold(noisy_logits, k)) / noise_std).mean(0)


def load_sigmoid(clean_logits, noisy_logits, noise_std, k):
    return torch.sigmoid((clean_logits - _threshold(noisy_logits, k)) / noise_std).sum(0)


def load_swapped_thresholds(clean_logits, noisy_logits, noise_std, k):  # inside/outside the wrong way round
    top = noisy_logits.topk(min(k + 1, noisy_logits.shape[-1]), -1).values
    if k >= noisy_logits.shape[-1]:
        return torch.full((noisy_logits.shape[-1],), float(noisy_logits.shape[0]))
    t = torch.where(noisy_logits >= top[:, k - 1:k], top[:, k - 1:k], top[:, k:k + 1])
    return torch.special.ndtr((clean_logits - t) / noise_std).sum(0)


def load_no_special_case(clean_logits, noisy_logits, noise_std, k):  # k = n_experts: topk(k+1) fails
    top = noisy_logits.topk(k + 1, -1).values
    t = torch.where(noisy_logits >= top[:, k - 1:k], top[:, k:k + 1], top[:, k - 1:k])
    return torch.special.ndtr((clean_logits - t) / noise_std).sum(0)


@pytest.mark.parametrize("wrong, hint", [
    (load_including_self, "exclude expert i itself"),
    (load_noisy_numerator, "start from the clean logit"),
    (load_no_std, "does not divide by the noise scale"),
    (load_counts, "no gradient"),
    (load_mean, "SUM of P(x, i)"),
    (load_sigmoid, "normal CDF"),
    (load_swapped_thresholds, None),
    (load_no_special_case, None),
])
def test_load_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "smooth_load", wrong, hint)


# --- MoE ----------------------------------------------------------------------------------------

class _Parts(sol.MoE):
    def parts(self, x, noise, use_noise=True):
        clean = x @ self.w_gate
        std = F.softplus(x @ self.w_noise)
        noisy = clean + noise * std if (noise is not None and use_noise) else clean
        gates = torch.softmax(sol.keep_top_k(noisy, self.k), -1)
        loss = (sol.importance_loss(gates, self.w_importance)
                + self.w_load * sol.cv_squared(sol.smooth_load(clean, noisy, std, self.k)))
        return gates, loss


class MoEDense(_Parts):
    def forward(self, x, noise=None):
        gates, loss = self.parts(x, noise)
        clean = x @ self.w_gate
        noisy = clean if noise is None else clean + noise * F.softplus(x @ self.w_noise)
        dense = torch.softmax(noisy, -1)
        return sum(dense[:, i:i + 1] * e(x) for i, e in enumerate(self.experts)), loss


class MoEEveryToken(_Parts):
    def forward(self, x, noise=None):
        gates, loss = self.parts(x, noise)
        return sum(gates[:, i:i + 1] * e(x) for i, e in enumerate(self.experts)), loss


class MoEUnweighted(_Parts):
    def forward(self, x, noise=None):
        gates, loss = self.parts(x, noise)
        y = torch.zeros_like(x)
        for i, e in enumerate(self.experts):
            rows = torch.nonzero(gates[:, i] > 0).squeeze(-1)
            if rows.numel():
                y = y.index_add(0, rows, e(x[rows]))
        return y, loss


class MoENoNoise(sol.MoE):
    def forward(self, x, noise=None):
        return super().forward(x, None)


class MoEImportanceOnly(_Parts):
    def forward(self, x, noise=None):
        y, _ = super().forward(x, noise)
        gates, _ = self.parts(x, noise)
        return y, sol.importance_loss(gates, self.w_importance)


class MoEOutputOnly(sol.MoE):
    def forward(self, x, noise=None):
        return super().forward(x, noise)[0]


class MoEBatchedExperts(_Parts):
    """Reads the expert weights directly instead of calling the experts: nothing is counted."""

    def forward(self, x, noise=None):
        gates, loss = self.parts(x, noise)
        y = torch.zeros_like(x)
        for i, e in enumerate(self.experts):
            y = y + gates[:, i:i + 1] * e.fc2(F.relu(e.fc1(x)))
        return y, loss


@pytest.mark.parametrize("wrong, hint", [
    (MoEDense, "softmax over ALL experts"),
    (MoEEveryToken, "not conditional computation"),
    (MoEUnweighted, "without weighting them"),
    (MoENoNoise, "without the noise"),
    (MoEImportanceOnly, "only the importance term"),
    (MoEOutputOnly, "the pair (output, balancing_loss)"),
    (MoEBatchedExperts, "no call of self.experts[i]"),
])
def test_moe_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "MoE", wrong, hint)


def test_moe_k_equals_n_is_the_dense_mixture():
    """The visible case with k = n_experts compares with the dense softmax mixture."""
    from autograders.engine.core import make_inputs
    case = next(c for c in ag.MOE.cases if c.name.startswith("k = n_experts = 3"))
    inputs = make_inputs(case, seed=0)
    y, _, counts = ag._moe_ref(inputs)
    _, noisy, _ = ag._noisy_logits(inputs["x"], inputs["w_gate"], inputs["w_noise"], inputs["noise"])
    dense = torch.softmax(noisy, -1)
    mixture = sum(dense[:, e:e + 1] * ag._expert_ref(inputs, e, inputs["x"]) for e in range(inputs["n_experts"]))
    torch.testing.assert_close(y, mixture)
    assert counts.tolist() == [inputs["x"].shape[0]] * inputs["n_experts"]


def test_moe_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be between"):
        sol.MoE(8, 8, n_experts=4, k=5)


def _passes_only_with_the_given_versions(name, wrong, monkeypatch):
    # sol.keep_top_k.__globals__: the namespace the notebook's cells ran in
    assert_graded_on_its_own(ag.CHECKS, name, sol.keep_top_k.__globals__, wrong, monkeypatch)


# --- later exercises get correct keep_top_k, cv_squared, importance_loss, smooth_load ----------------

def keep_top_k_zero(logits, k):
    idx = torch.topk(logits, k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)
    return logits.masked_fill(~keep, 0.0)


def cv_not_squared(values):
    return values.std(unbiased=False) / values.mean()


def importance_unweighted(gates, w_importance=1.0):
    return sol.cv_squared(gates.sum(0))


def load_counts(clean_logits, noisy_logits, noise_std, k):
    idx = torch.topk(noisy_logits, k, dim=-1).indices
    return torch.zeros_like(noisy_logits).scatter(-1, idx, 1.0).sum(0)


@pytest.mark.parametrize("name, wrong", [
    ("noisy_top_k_gating", {"keep_top_k": keep_top_k_zero}),
    ("MoE", {"keep_top_k": keep_top_k_zero}),
    ("MoE", {"cv_squared": cv_not_squared, "importance_loss": importance_unweighted, "smooth_load": load_counts}),
], ids=["gating", "MoE keep_top_k", "MoE losses"])
def test_a_wrong_earlier_exercise_does_not_fail_a_later_one(name, wrong, monkeypatch):
    _passes_only_with_the_given_versions(name, wrong, monkeypatch)


def test_importance_loss_uses_the_students_cv_squared():
    """Graded in the same cell as cv_squared, so no given version: the grader could not answer it yet."""
    assert ag.CHECKS["importance_loss"].task.uses == ()
