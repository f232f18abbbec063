"""Checks for chapter 15, Sora / DiT.

References: spacetime patches by explicit indexing (token ``(i, j, k)`` of the grid holds the voxels
``[i*pf:(i+1)*pf, j*ph:(j+1)*ph, k*pw:(k+1)*pw]`` in (pf, ph, pw, channel) order: vit-pytorch's
``b c (f pf) (h p1) (w p2) -> b (f h w) (pf p1 p2 c)``, written out without einops, which is not
installed); DiT's ``modulate`` formula; ``coursekit.dit.DiTBlock`` and ``coursekit.dit.zero_init``
(DiT's ``models.py``; ``tests/test_coursekit_dit.py`` checks the block against diffusers'
``AdaLayerNormZero``); and for the sampler diffusers' ``DDIMScheduler`` stepped with diffusers'
``ClassifierFreeGuidance`` guider (every channel guided).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autograders.engine.core import EXACT, Check, CheckSet, Mistake, Tolerance
from autograders.harness import sora_dit as H
from coursekit import dit as D

CHAPTER = H.CHAPTER

BLOCK_TOL = Tolerance(1e-5, 1e-5, "float32: two LayerNorms, attention and an MLP on tokens of size <= 64; the same "
                                  "operations in another order differ by ~1e-6")
MOD_TOL = Tolerance(1e-6, 1e-6, "float32: one product and one sum per element")
SAMPLER_TOL = Tolerance(1e-4, 1e-4, "float32: up to 8 DDIM steps of a small DiT; a batch of two halves and two "
                                    "separate passes differ by ~1e-6 per step, amplified by 1/sqrt(abar) near t=T")


# ---------------------------------------------------------------------------------------------
# 1-2. patchify / unpatchify

def _loop_patchify(x: torch.Tensor, patch) -> torch.Tensor:
    pf, ph, pw = patch
    b, c, f, h, w = x.shape
    tokens = []
    for i in range(f // pf):
        for j in range(h // ph):
            for k in range(w // pw):
                cube = x[:, :, i * pf:(i + 1) * pf, j * ph:(j + 1) * ph, k * pw:(k + 1) * pw]   # b c pf ph pw
                tokens.append(cube.permute(0, 2, 3, 4, 1).reshape(b, -1))                       # (pf ph pw c)
    return torch.stack(tokens, dim=1)


def _loop_unpatchify(tokens: torch.Tensor, patch, shape) -> torch.Tensor:
    pf, ph, pw = patch
    c, f, h, w = shape
    b = tokens.shape[0]
    x = torch.empty(b, c, f, h, w, dtype=tokens.dtype)
    n = 0
    for i in range(f // pf):
        for j in range(h // ph):
            for k in range(w // pw):
                cube = tokens[:, n].reshape(b, pf, ph, pw, c).permute(0, 4, 1, 2, 3)
                x[:, :, i * pf:(i + 1) * pf, j * ph:(j + 1) * ph, k * pw:(k + 1) * pw] = cube
                n += 1
    return x


def _patchify_variant(order: str):
    """Wrong orders: 'channel-first' features (c pf ph pw), 'time-last' tokens (h w f), 'no-permute' (a plain
    reshape), 'pw-ph' (columns before rows inside a token)."""
    def impl(x, patch):
        pf, ph, pw = patch
        b, c, f, h, w = x.shape
        if order == "no-permute":
            return x.reshape(b, (f // pf) * (h // ph) * (w // pw), -1)
        y = x.reshape(b, c, f // pf, pf, h // ph, ph, w // pw, pw)
        perm = {"channel-first": (0, 2, 4, 6, 1, 3, 5, 7), "time-last": (0, 4, 6, 2, 3, 5, 7, 1),
                "pw-ph": (0, 2, 4, 6, 3, 7, 5, 1)}[order]
        return y.permute(*perm).reshape(b, (f // pf) * (h // ph) * (w // pw), -1)
    return impl


def _unpatchify_variant(order: str):
    def impl(tokens, patch, shape):
        pf, ph, pw = patch
        c, f, h, w = shape
        b = tokens.shape[0]
        if order == "no-permute":
            return tokens.reshape(b, c, f, h, w)
        if order == "channel-first":
            y = tokens.reshape(b, f // pf, h // ph, w // pw, c, pf, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        elif order == "time-last":
            y = tokens.reshape(b, h // ph, w // pw, f // pf, pf, ph, pw, c).permute(0, 7, 3, 4, 1, 5, 2, 6)
        else:  # rows and columns of the grid swapped
            y = tokens.reshape(b, f // pf, w // pw, h // ph, pf, ph, pw, c).permute(0, 7, 1, 4, 3, 5, 2, 6)
        return y.reshape(b, c, f, h, w)
    return impl


PATCHIFY = Check(
    H.PATCHIFY,
    reference=lambda i: _loop_patchify(i["x"], i["patch"]),
    tolerance=EXACT,
    mistakes=(
        Mistake("channel-first token values", _patchify_variant("channel-first"),
                "your tokens hold the right voxels but in (channel, pf, ph, pw) order: put the channel LAST, "
                "(pf, ph, pw, c), as in 'b (f h w) (pf p1 p2 c)'."),
        Mistake("time as the last grid axis", _patchify_variant("time-last"),
                "your tokens come in (row, column, frame) order: the grid is read frame by frame, (f, h, w)."),
        Mistake("a reshape without a permute", _patchify_variant("no-permute"),
                "your tokens are consecutive runs of the flattened clip (a reshape alone): a token must be a "
                "pf x ph x pw cube, so split each axis in two with reshape, then permute the grid axes in front."),
        Mistake("columns before rows inside a token", _patchify_variant("pw-ph"),
                "inside a token your values run over columns before rows: the order is (pf, ph, pw, c)."),
    ),
)


def _unpatchify_ref(i):
    return _loop_unpatchify(i["tokens"], i["patch"], i["shape"]), i["clip"]


UNPATCHIFY = Check(
    H.UNPATCHIFY,
    reference=_unpatchify_ref,
    tolerance=EXACT,
    mistakes=(
        Mistake("channel-first token values", _unpatchify_variant("channel-first"),
                "you read each token's values as (channel, pf, ph, pw): patchify wrote them as (pf, ph, pw, c)."),
        Mistake("time as the last grid axis", _unpatchify_variant("time-last"),
                "you read the tokens in (row, column, frame) order: patchify wrote them frame by frame, (f, h, w)."),
        Mistake("a reshape without a permute", _unpatchify_variant("no-permute"),
                "you reshaped the tokens straight into a clip: undo patchify's permute first (grid axes and "
                "patch axes interleaved back: b c f pf h ph w pw), then merge."),
        Mistake("rows and columns of the grid swapped", _unpatchify_variant("grid-swap"),
                "you read the token grid as (frame, column, row): it is (frame, row, column)."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 3. modulate

MODULATE = Check(
    H.MODULATE,
    reference=lambda i: i["x"] * (1 + i["scale"].unsqueeze(1)) + i["shift"].unsqueeze(1),
    tolerance=MOD_TOL,
    mistakes=(
        Mistake("scale without the 1", lambda x, shift, scale: x * scale.unsqueeze(1) + shift.unsqueeze(1),
                "you multiply by scale: DiT multiplies by (1 + scale), so that a zero scale (adaLN-Zero's start) "
                "keeps the tokens instead of erasing them."),
        Mistake("shift and scale swapped", lambda x, shift, scale: x * (1 + shift.unsqueeze(1)) + scale.unsqueeze(1),
                "you scale by the shift and add the scale: x * (1 + scale) + shift."),
        Mistake("shift before the scale", lambda x, shift, scale: (x + shift.unsqueeze(1)) * (1 + scale.unsqueeze(1)),
                "you add the shift before scaling: scale first, then add the shift, x * (1 + scale) + shift."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 4. the DiT block

def _block_ref(i):
    torch.manual_seed(i["seed"])
    block = D.DiTBlock(i["hidden_size"], i["num_heads"], i["mlp_ratio"])
    block.load_state_dict(H.randomized_block_state(block, i["seed"]))
    with torch.no_grad():
        return torch.tensor([1.0]), block(i["x"], i["c"])


class _BlockVariant(D.DiTBlock):
    """Wrong blocks: kind in {'no-zero', 'no-gate', 'chunk-order', 'shared-modulation', 'post-norm'}."""

    kind = ""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        if self.kind == "no-zero":
            lin = self.adaLN_modulation[-1]
            nn.init.kaiming_uniform_(lin.weight, a=5 ** 0.5)          # nn.Linear's defaults
            nn.init.uniform_(lin.bias, -hidden_size ** -0.5, hidden_size ** -0.5)

    def forward(self, x, c):
        m = self.adaLN_modulation(c).chunk(6, dim=1)
        if self.kind == "chunk-order":
            scale_msa, shift_msa, gate_msa, scale_mlp, shift_mlp, gate_mlp = m
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = m
        if self.kind == "shared-modulation":
            shift_mlp, scale_mlp, gate_mlp = shift_msa, scale_msa, gate_msa
        if self.kind == "no-gate":
            gate_msa = gate_mlp = torch.ones_like(gate_msa)
        if self.kind == "post-norm":
            x = D.modulate(self.norm1(x + gate_msa.unsqueeze(1) * self.attn(x)), shift_msa, scale_msa)
            return D.modulate(self.norm2(x + gate_mlp.unsqueeze(1) * self.mlp(x)), shift_mlp, scale_mlp)
        x = x + gate_msa.unsqueeze(1) * self.attn(D.modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(D.modulate(self.norm2(x), shift_mlp, scale_mlp))


def _block_variant(kind: str):
    return type(f"Block_{kind.replace('-', '_')}", (_BlockVariant,), {"kind": kind})


BLOCK = Check(
    H.BLOCK,
    reference=_block_ref,
    tolerance=BLOCK_TOL,
    mistakes=(
        Mistake("no zero initialisation", _block_variant("no-zero"),
                "your fresh block changes its input: adaLN-Zero initialises the modulation Linear (weight AND bias) "
                "to zero, so every gate starts at 0 and the block starts as the identity."),
        Mistake("no gates", _block_variant("no-gate"),
                "your residual branches are added without their gates: x + gate * attn(...) and x + gate * mlp(...)."),
        Mistake("chunk order", _block_variant("chunk-order"),
                "you read the six modulation vectors in the wrong order: DiT's order is shift_msa, scale_msa, "
                "gate_msa, shift_mlp, scale_mlp, gate_mlp."),
        Mistake("one modulation for both branches", _block_variant("shared-modulation"),
                "your MLP branch reuses the attention branch's shift, scale and gate: it has its own three."),
        Mistake("post-norm", _block_variant("post-norm"),
                "you normalise after the residual sum: DiT is pre-norm, x + gate * attn(modulate(norm1(x), ...))."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 5. zero_init

def _zero_init_ref(i):
    model = H.random_dit(i)
    D.zero_init(model)
    with torch.no_grad():
        out = model(i["x"], i["t"], i["labels"])
    names = sorted(model.state_dict())
    zeroed = torch.tensor([1.0 if ("adaLN_modulation" in k or k.startswith("final_layer.linear")) else 0.0
                           for k in names])
    return torch.zeros_like(out), torch.zeros(len(model.blocks)), zeroed


def _zero_variant(blocks=True, final_linear=True, final_modulation=True, everything=False, gates_only=False):
    def impl(model):
        with torch.no_grad():
            if everything:
                for p in model.parameters():
                    p.zero_()
                return model
            if blocks:
                for block in model.blocks:
                    lin = block.adaLN_modulation[-1]
                    if gates_only:
                        d = lin.weight.shape[1]
                        for k in (2, 5):
                            lin.weight[k * d:(k + 1) * d] = 0
                            lin.bias[k * d:(k + 1) * d] = 0
                    else:
                        lin.weight.zero_()
                        lin.bias.zero_()
            if final_linear:
                model.final_layer.linear.weight.zero_()
                model.final_layer.linear.bias.zero_()
            if final_modulation:
                model.final_layer.adaLN_modulation[-1].weight.zero_()
                model.final_layer.adaLN_modulation[-1].bias.zero_()
        return model
    return impl


ZERO_INIT = Check(
    H.ZERO_INIT,
    reference=_zero_init_ref,
    tolerance=EXACT,
    mistakes=(
        Mistake("only the final layer", _zero_variant(blocks=False),
                "the model outputs 0, but its blocks are not the identity: zero every block's adaLN_modulation "
                "Linear too, so that each block starts as the identity."),
        Mistake("only the blocks", _zero_variant(final_linear=False, final_modulation=False),
                "every block is the identity, but the model does not output 0: zero the final layer's Linear "
                "(and its modulation), as DiT does."),
        Mistake("every parameter", _zero_variant(everything=True),
                "you zeroed every parameter: only the modulation Linears and the final Linear start at 0; the "
                "attention, MLPs and embeddings keep their random initialisation (otherwise no gradient can "
                "reach them and the blocks stay identical)."),
        Mistake("final modulation left out", _zero_variant(final_modulation=False),
                "the final layer's adaLN_modulation Linear is not zeroed: DiT zeroes it as well as the final Linear."),
        Mistake("only the gates", _zero_variant(gates_only=True),
                "you zeroed only the gate rows of the blocks' modulation: DiT zeroes the whole Linear (shift and "
                "scale start at 0 too, so every block starts as the identity around a plain LayerNorm)."),
    ),
)


# ---------------------------------------------------------------------------------------------
# 6. the guided sampler

def _guider(scale: float):
    """diffusers' ClassifierFreeGuidance, built without its "experimental feature" log line."""
    import logging

    from diffusers.guiders import ClassifierFreeGuidance

    log = logging.getLogger("diffusers.guiders.guider_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return ClassifierFreeGuidance(guidance_scale=scale)
    finally:
        log.setLevel(level)


def _sampler_ref(i):
    from diffusers import DDIMScheduler

    model = H.random_dit(i)
    scheduler = DDIMScheduler(num_train_timesteps=i["T"], beta_schedule="squaredcos_cap_v2" if i["cosine"] else "linear",
                              clip_sample=i["clip_sample"], set_alpha_to_one=True)
    scheduler.set_timesteps(i["steps"])
    guider = _guider(i["guidance_scale"])
    x, labels = i["x"].clone(), i["labels"]
    null = torch.tensor([[10, 4]]).expand(len(labels), -1)
    with torch.no_grad():
        for t in scheduler.timesteps:
            tb = torch.full((len(x),), int(t), dtype=torch.int64)
            uncond, cond = model(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([null, labels])).chunk(2)
            x = scheduler.step(guider.forward(cond, uncond).pred, int(t), x).prev_sample
    passes = 1 if i["guidance_scale"] == 1.0 else 2
    return x, torch.tensor([float(passes * i["steps"] * len(labels))])


def _sampler_variant(kind: str):
    def impl(model, scheduler, x, labels, null_labels, guidance_scale):
        steps = list(scheduler.timesteps)
        if kind == "ascending":
            steps = steps[::-1]
        for t in steps:
            tb = torch.full((x.shape[0],), int(t), dtype=torch.int64)
            if kind == "two-passes-always" or guidance_scale != 1.0:
                uncond, cond = model(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([null_labels, labels])).chunk(2)
            else:
                cond = uncond = model(x, tb, labels)
            if kind == "three-channels":
                eps = cond.clone()
                eps[:, :3] = uncond[:, :3] + guidance_scale * (cond[:, :3] - uncond[:, :3])
            elif kind == "swapped":
                eps = cond + guidance_scale * (uncond - cond)
            elif kind == "conditional-only":
                eps = cond
            else:
                eps = uncond + guidance_scale * (cond - uncond)
            x = scheduler.step(eps, int(t), x).prev_sample
        return x
    return impl


SAMPLER = Check(
    H.SAMPLER,
    reference=_sampler_ref,
    tolerance=SAMPLER_TOL,
    mistakes=(
        Mistake("only 3 channels guided", _sampler_variant("three-channels"),
                "your sampler guides only the first 3 channels -- the bug of DiT's forward_with_cfg: guide EVERY "
                "channel, uncond + scale * (cond - uncond) on the whole prediction."),
        Mistake("roles swapped", _sampler_variant("swapped"),
                "your guidance moves away from the conditional prediction: uncond + scale * (cond - uncond)."),
        Mistake("no guidance", _sampler_variant("conditional-only"),
                "your sampler uses the conditional prediction alone: combine it with the unconditional one "
                "(the null labels), uncond + scale * (cond - uncond)."),
        Mistake("timesteps upwards", _sampler_variant("ascending"),
                "your sampler walks the timesteps upwards: follow scheduler.timesteps, from the noisiest down to 0."),
        Mistake("two passes at scale 1", _sampler_variant("two-passes-always"),
                "at guidance scale 1 the guided prediction IS the conditional one: call the model once per step "
                "(on the batch with its labels), not on the doubled batch."),
    ),
)


CHECKS = CheckSet(CHAPTER, [PATCHIFY, UNPATCHIFY, MODULATE, BLOCK, ZERO_INIT, SAMPLER])
check = CHECKS.check
