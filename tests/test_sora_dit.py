"""Chapter 15: the solution passes every check; plausible wrong answers and the stubs are rejected."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from autograders import sora_dit as ag
from autograders.engine.core import make_inputs
from autograders.harness import sora_dit as H
from checks_support import chapter_tests, assert_accepts, assert_rejects
from coursekit import dit as D
from notebook_code import load_solutions

sol = load_solutions(ag.CHAPTER)
NAMES = ["patchify", "unpatchify", "modulate", "DiTBlock", "zero_init", "guided_sample"]
globals().update(chapter_tests(ag.CHECKS, H.TASKS, NAMES, sol))


def test_block_stub_fails():
    class Stub(nn.Module):
        def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
            super().__init__()
            raise NotImplementedError()
    assert "not implemented yet" in assert_rejects(ag.CHECKS, "DiTBlock", Stub)


def test_grading_cells_do_not_train():
    for name in ("net", "train", "judge", "losses", "results"):
        assert not hasattr(sol, name), f"{name} is defined before the last exercise"


# --- the references agree with coursekit and with each other ---------------------------------------

def test_loop_references_equal_coursekit_and_round_trip():
    for case in H.PATCHIFY.cases:
        i = make_inputs(case, seed=4)
        tokens = ag.PATCHIFY.reference(i)
        assert torch.equal(tokens, D.patchify(i["x"], i["patch"]))
        c, f, h, w = i["x"].shape[1:]
        assert torch.equal(ag._loop_unpatchify(tokens, i["patch"], (c, f, h, w)), i["x"])


def test_sampler_reference_equals_coursekit_scheduler_loop():
    from coursekit.diffusion import guided, sample_loop

    for case in H.SAMPLER.cases:
        i = make_inputs(case, seed=5)
        expected, clips = ag.SAMPLER.reference(i)
        model = H.random_dit(i)
        null = torch.tensor([[10, 4]]).expand(len(i["labels"]), -1)
        ours, _ = sample_loop(guided(model, {"labels": i["labels"]}, {"labels": null}, i["guidance_scale"]),
                              H.make_scheduler(i), sample=i["x"].clone())
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


# --- wrong implementations written as a student might --------------------------------------------------

def patchify_unfold(x, patch):
    pf, ph, pw = patch
    b, c = x.shape[:2]
    y = x.unfold(2, pf, pf).unfold(3, ph, ph).unfold(4, pw, pw)       # b c f h w pf ph pw
    return y.permute(0, 2, 3, 4, 5, 6, 7, 1).reshape(b, -1, pf * ph * pw * c)


def patchify_conv(x, patch):
    c = x.shape[1]
    k = int(torch.tensor(patch).prod()) * c
    weight = torch.eye(k).reshape(k, *patch, c).permute(0, 4, 1, 2, 3)
    return torch.nn.functional.conv3d(x, weight, stride=patch).flatten(2).transpose(1, 2)


def patchify_transposed_hw(x, patch):
    return sol.patchify(x.transpose(3, 4), (patch[0], patch[2], patch[1]))


def patchify_frame_first_values(x, patch):
    pf, ph, pw = patch
    b, c, f, h, w = x.shape
    y = x.reshape(b, c, f // pf, pf, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return y.reshape(b, -1, c * pf * ph * pw)


def test_patchify_with_unfold_is_refused():
    assert_rejects(ag.CHECKS, "patchify", patchify_unfold, "reshape and permute")


def test_patchify_with_conv3d_is_refused():
    assert_rejects(ag.CHECKS, "patchify", patchify_conv, "reshape and permute")


@pytest.mark.parametrize("wrong, hint", [
    (patchify_transposed_hw, None),
    (patchify_frame_first_values, "channel LAST"),
    (lambda x, patch: sol.patchify(x, patch).flip(1), None),
])
def test_patchify_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "patchify", wrong, hint)


def unpatchify_no_permute(tokens, patch, shape):
    return tokens.reshape(tokens.shape[0], *shape)


def unpatchify_from_patchify_order(tokens, patch, shape):
    # undoes the permutation patchify used by applying it again
    pf, ph, pw = patch
    c, f, h, w = shape
    b = tokens.shape[0]
    y = tokens.reshape(b, f // pf, h // ph, w // pw, pf, ph, pw, c).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return y.reshape(b, c, f, h, w)


@pytest.mark.parametrize("wrong, hint", [
    (unpatchify_no_permute, "undo patchify's permute"),
    (unpatchify_from_patchify_order, None),
    (lambda tokens, patch, shape: sol.unpatchify(tokens, patch, shape).flip(2), None),
])
def test_unpatchify_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "unpatchify", wrong, hint)


@pytest.mark.parametrize("wrong, hint", [
    (lambda x, shift, scale: x * scale.unsqueeze(1) + shift.unsqueeze(1), "(1 + scale)"),
    (lambda x, shift, scale: x * (1 + scale.unsqueeze(1)), None),
    (lambda x, shift, scale: x * (1 + scale.mean(0)) + shift.mean(0), None),
])
def test_modulate_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "modulate", wrong, hint)


class BlockAffineNorm(D.DiTBlock):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)


class BlockRandomModulation(sol.DiTBlock):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        nn.init.normal_(self.adaLN_modulation[-1].weight, std=1e-3)


class BlockSwappedBranches(sol.DiTBlock):
    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.mlp(sol.modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.attn(sol.modulate(self.norm2(x), shift_mlp, scale_mlp))


class BlockNoNorm(sol.DiTBlock):
    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(sol.modulate(x, shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(sol.modulate(x, shift_mlp, scale_mlp))


@pytest.mark.parametrize("wrong, hint", [
    (BlockAffineNorm, "parameters are named"),
    (BlockRandomModulation, "fresh block changes its input"),
    (BlockSwappedBranches, None),
    (BlockNoNorm, None),
])
def test_block_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "DiTBlock", wrong, hint)


def zero_init_new_model(model):
    fresh = D.DiT(model.input_size, model.patch_size, model.in_channels, model.pos_embed.shape[-1], len(model.blocks),
                  model.blocks[0].attn.num_heads, num_classes=model.y_embedder.num_classes)
    return fresh


def zero_init_weights_only(model):
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.zero_()
        model.final_layer.linear.weight.zero_()
        model.final_layer.adaLN_modulation[-1].weight.zero_()
    return model


def zero_init_tiny(model):
    with torch.no_grad():
        for p in list(model.final_layer.parameters()) + [p for b in model.blocks for p in b.adaLN_modulation.parameters()]:
            p.mul_(1e-8)
    return model


@pytest.mark.parametrize("wrong, hint", [
    (zero_init_new_model, "in place"),
    (zero_init_weights_only, None),
    (zero_init_tiny, None),
])
def test_zero_init_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "zero_init", wrong, hint)


def sampler_separate_passes(model, scheduler, x, labels, null_labels, guidance_scale):
    for t in scheduler.timesteps:
        tb = torch.full((x.shape[0],), int(t), dtype=torch.int64)
        cond = model(x, tb, labels)
        if guidance_scale != 1.0:
            uncond = model(x, tb, null_labels)
            cond = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(cond, int(t), x).prev_sample
    return x


def sampler_x0_out(model, scheduler, x, labels, null_labels, guidance_scale):
    for t in scheduler.timesteps:
        tb = torch.full((x.shape[0],), int(t), dtype=torch.int64)
        uncond, cond = model(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([null_labels, labels])).chunk(2)
        out = scheduler.step(uncond + guidance_scale * (cond - uncond), int(t), x)
        x = out.prev_sample
    return out.pred_original_sample * 0.5


def sampler_halves_swapped(model, scheduler, x, labels, null_labels, guidance_scale):
    for t in scheduler.timesteps:
        tb = torch.full((x.shape[0],), int(t), dtype=torch.int64)
        cond, uncond = model(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([null_labels, labels])).chunk(2)
        x = scheduler.step(uncond + guidance_scale * (cond - uncond), int(t), x).prev_sample
    return x


def test_sampler_with_two_separate_passes_passes():
    assert_accepts(ag.CHECKS, "guided_sample", sampler_separate_passes)


@pytest.mark.parametrize("wrong, hint", [
    (sampler_x0_out, None),
    (sampler_halves_swapped, None),
    (lambda m, s, x, y, n, g: x, None),
])
def test_sampler_rejects(wrong, hint):
    assert_rejects(ag.CHECKS, "guided_sample", wrong, hint)


# --- coursekit's own versions may not stand in for the exercises ------------------------------------------

def _course_sampler(model, scheduler, x, labels, null_labels, guidance_scale):
    from coursekit.diffusion import guided, sample_loop

    fn = guided(lambda x, t, labels: model(x, t.expand(len(x)) if t.ndim == 0 else t, labels),
                {"labels": labels}, {"labels": null_labels}, guidance_scale)
    return sample_loop(fn, scheduler, sample=x)[0]


@pytest.mark.parametrize("name, impl", [
    ("patchify", D.patchify),
    ("patchify", lambda x, patch: __import__("coursekit.dit", fromlist=["x"]).patchify(x, patch)),
    ("unpatchify", D.unpatchify),
    ("modulate", D.modulate),
    ("DiTBlock", type("MyBlock", (D.DiTBlock,), {})),
    ("zero_init", D.zero_init),
    ("zero_init", lambda model: D.initialize_weights(model)),
    ("guided_sample", _course_sampler),
])
def test_the_course_versions_are_rejected(name, impl):
    assert "the course's own" in assert_rejects(ag.CHECKS, name, impl, "may not be called here")
