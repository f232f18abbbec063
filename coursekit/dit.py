"""A Diffusion Transformer (DiT) for video: spacetime patches, adaLN-Zero blocks, fixed sin-cos positions.

One file in the layout of DiT's reference ``models.py`` (Peebles & Xie, "Scalable Diffusion Models with
Transformers", 2023), cut down to what chapter 15 (Sora) needs and extended from images to clips:

* a clip ``(B, C, F, H, W)`` (channels, frames, height, width) is cut into **tubelets** of
  ``pf x ph x pw`` (frames x pixels x pixels), each flattened and linearly embedded: the tokens are
  ``(B, N, hidden)`` with ``N = F/pf * H/ph * W/pw``. The rearrangement is the one vit-pytorch's ``vit_3d``
  writes as ``b c (f pf) (h p1) (w p2) -> b (f h w) (pf p1 p2 c)``;
* positions are FIXED 3-D sin-cos embeddings (a quarter of the width for time, the rest split between columns
  and rows, as diffusers' ``get_3d_sincos_pos_embed``), not learned ones;
* the timestep and the class labels are embedded and SUMMED into one conditioning vector ``c``
  ``(B, hidden)``; every block reads ``c`` through **adaLN-Zero**: a ``Linear(hidden, 6 * hidden)``
  turns ``c`` into shift, scale and gate for the attention branch and for the MLP branch;
* the zero initialisation (the "Zero" of adaLN-Zero): every block's modulation layer and the final layer
  (its modulation and its output projection) start at exactly zero. All gates are then 0, so every
  residual branch adds nothing and **each fresh block is the identity**, and the final projection makes
  a **fresh DiT output exactly 0** -- the network starts as "predict no noise" and grows from there,
  which the DiT paper found trains better than any other way of injecting the condition.

Labels: ``num_classes`` is a sequence of class counts, one label table per column of ``labels``
``(B, len(num_classes))`` (e.g. a digit and a direction); index ``num_classes[k]`` of table ``k`` is its
"null" label, the unconditional input that classifier-free guidance needs (as DiT's ``LabelEmbedder``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiT", "DiTBlock", "FinalLayer", "Attention", "Mlp", "LabelEmbedder", "TimestepEmbedder", "modulate",
           "patchify", "unpatchify", "sincos_pos_embed_3d", "initialize_weights", "zero_init"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN's affine map per sample: ``x * (1 + scale) + shift`` with ``x`` ``(B, N, D)`` and shift, scale
    ``(B, D)`` (one value per sample and channel, the same for every token). ``1 + scale``: a zero scale
    leaves the normalised tokens unchanged."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ---------------------------------------------------------------------------------------------
#                                 Spacetime patches (tubelets)
# ---------------------------------------------------------------------------------------------

def _check_patch(x: torch.Tensor, patch: Sequence[int]) -> tuple[int, int, int]:
    if x.ndim != 5:
        raise ValueError(f"expected a clip (B, C, F, H, W), got shape {tuple(x.shape)}")
    pf, ph, pw = (int(p) for p in patch)
    _, _, f, h, w = x.shape
    if f % pf or h % ph or w % pw:
        raise ValueError(f"clip of {f}x{h}x{w} (frames x height x width) is not divisible into {pf}x{ph}x{pw} patches")
    return pf, ph, pw


def patchify(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """``(B, C, F, H, W)`` -> ``(B, N, pf*ph*pw*C)``: tokens in (frame, row, column) order, each token's
    features in (pf, ph, pw, channel) order."""
    pf, ph, pw = _check_patch(x, patch)
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f // pf, pf, h // ph, ph, w // pw, pw)   # b c f pf h p1 w p2
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)                        # b f h w pf p1 p2 c
    return x.reshape(b, (f // pf) * (h // ph) * (w // pw), pf * ph * pw * c)


def unpatchify(tokens: torch.Tensor, patch: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The exact inverse of :func:`patchify`: ``(B, N, pf*ph*pw*C)`` -> ``(B, C, F, H, W)`` with
    ``shape = (C, F, H, W)``."""
    c, f, h, w = (int(s) for s in shape)
    pf, ph, pw = (int(p) for p in patch)
    b = tokens.shape[0]
    if f % pf or h % ph or w % pw or tokens.shape[1:] != (f // pf * (h // ph) * (w // pw), pf * ph * pw * c):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not fit a clip {tuple(shape)} in {pf}x{ph}x{pw} patches")
    x = tokens.reshape(b, f // pf, h // ph, w // pw, pf, ph, pw, c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)                        # b c f pf h p1 w p2
    return x.reshape(b, c, f, h, w)


# ---------------------------------------------------------------------------------------------
#                     Embedding layers for timesteps, class labels and positions
# ---------------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal frequencies (as in the Transformer's positions) then an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """``(B,)`` timesteps (may be fractional) -> ``(B, dim)``: ``[cos(t w_k), sin(t w_k)]``."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))     # (B, hidden)


class LabelEmbedder(nn.Module):
    """One embedding table per label column, summed; row ``num_classes[k]`` of table ``k`` is the null label.
    During training a fraction ``dropout_prob`` of the samples get the null labels (all columns at once),
    so that one network learns the conditional and the unconditional model (classifier-free guidance)."""

    def __init__(self, num_classes: Sequence[int], hidden_size: int, dropout_prob: float = 0.1):
        super().__init__()
        self.num_classes = tuple(int(n) for n in num_classes)
        self.tables = nn.ModuleList(nn.Embedding(n + 1, hidden_size) for n in self.num_classes)
        self.dropout_prob = dropout_prob

    def null_labels(self, batch: int, device=None) -> torch.Tensor:
        return torch.tensor(self.num_classes, device=device).expand(batch, -1).clone()

    def forward(self, labels: torch.Tensor, train: bool = False, generator: torch.Generator | None = None):
        if labels.ndim == 1:
            labels = labels[:, None]
        if labels.shape[1] != len(self.tables):
            raise ValueError(f"labels {tuple(labels.shape)}: expected {len(self.tables)} column(s)")
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], generator=generator).to(labels.device) < self.dropout_prob
            labels = torch.where(drop[:, None], self.null_labels(labels.shape[0], labels.device), labels)
        return sum(table(labels[:, k]) for k, table in enumerate(self.tables))          # (B, hidden)


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(positions.reshape(-1), omega)                                           # (M, dim/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_3d(hidden_size: int, grid: Sequence[int]) -> torch.Tensor:
    """Fixed positions ``(f*h*w, hidden)`` for a (frames, rows, columns) grid of tokens, in patchify's order:
    the first quarter of the channels encodes the frame index, the rest DiT's 2-D sin-cos embedding of the
    (column, row) position (3/8 each) -- the layout of diffusers' ``get_3d_sincos_pos_embed`` (CogVideoX),
    equal to it in ``tests/test_coursekit_dit.py``. ``hidden_size`` must be a multiple of 16."""
    if hidden_size % 16:
        raise ValueError(f"hidden_size must be a multiple of 16 for 3-D sin-cos positions, got {hidden_size}")
    f, h, w = (int(g) for g in grid)
    d_t = hidden_size // 4
    d_s = (hidden_size - d_t) // 2
    tt, hh, ww = np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij")
    emb = np.concatenate([_sincos_1d(d_t, tt), _sincos_1d(d_s, ww), _sincos_1d(d_s, hh)], axis=1)
    return torch.from_numpy(emb).float()


# ---------------------------------------------------------------------------------------------
#                                    Core DiT model
# ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention over the tokens (one ``qkv`` projection, ``proj`` out)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)                                    # (B, heads, N, d/heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc1`` -> GELU (tanh approximation, as DiT) -> ``fc2``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A Transformer block whose LayerNorms carry no parameters of their own: the shift and scale (and a
    gate on each residual branch) are computed from the condition ``c`` by ``adaLN_modulation``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)   # adaLN-Zero: gates start at 0, the block at identity
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, N, D) tokens; c: (B, D) condition -> six (B, D) vectors
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift and scale, no gate) then a Linear from ``hidden`` to one patch's values."""

    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_volume * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))                  # (B, N, patch values)


def zero_init(model: "DiT") -> "DiT":
    """adaLN-Zero: zero every block's modulation Linear and the final layer's modulation and output Linear
    (weights and biases); nothing else. Afterwards the model outputs exactly 0 and each block is the identity."""
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def initialize_weights(model: "DiT", zero: bool = True) -> "DiT":
    """DiT's initialisation: Xavier-uniform Linears with zero biases, N(0, 0.02) label tables and timestep
    MLP, then (``zero=True``) the adaLN-Zero layers set to zero by :func:`zero_init`."""
    def basic(module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    model.apply(basic)
    for table in model.y_embedder.tables:
        nn.init.normal_(table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    return zero_init(model) if zero else model


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone, for clips ``(B, C, F, H, W)``.

    ``model(x, t, labels) -> eps`` of the shape of ``x`` (noise prediction; ``t`` ``(B,)`` int64 timesteps,
    ``labels`` ``(B, len(num_classes))`` int64, or ``(B,)`` for one table)."""

    def __init__(self, input_size: Sequence[int] = (4, 12, 12), patch_size: Sequence[int] = (2, 4, 4),
                 in_channels: int = 1, hidden_size: int = 64, depth: int = 4, num_heads: int = 4,
                 mlp_ratio: float = 4.0, num_classes: Sequence[int] = (10,), class_dropout_prob: float = 0.1):
        super().__init__()
        self.input_size = tuple(int(s) for s in input_size)
        self.patch_size = tuple(int(p) for p in patch_size)
        if any(s % p for s, p in zip(self.input_size, self.patch_size)):
            raise ValueError(f"input {self.input_size} is not divisible into patches {self.patch_size}")
        self.in_channels = self.out_channels = in_channels
        self.grid = tuple(s // p for s, p in zip(self.input_size, self.patch_size))        # (f, h, w) tokens
        patch_volume = math.prod(self.patch_size)

        self.x_embedder = nn.Linear(patch_volume * in_channels, hidden_size)            # a Conv3d with stride = kernel
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.register_buffer("pos_embed", sincos_pos_embed_3d(hidden_size, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_volume, self.out_channels)
        initialize_weights(self)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def condition(self, t: torch.Tensor, labels: torch.Tensor, train: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """``c = t_embedding + label_embedding``, ``(B, hidden)``."""
        return self.t_embedder(t) + self.y_embedder(labels, train=train, generator=generator)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, train: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        if tuple(x.shape[1:]) != (self.in_channels, *self.input_size):
            raise ValueError(f"expected clips (B, {self.in_channels}, {', '.join(map(str, self.input_size))}), "
                             f"got {tuple(x.shape)}")
        tokens = self.x_embedder(patchify(x, self.patch_size)) + self.pos_embed          # (B, N, D)
        c = self.condition(t, labels, train=train, generator=generator)                 # (B, D)
        for block in self.blocks:
            tokens = block(tokens, c)                                                     # (B, N, D)
        tokens = self.final_layer(tokens, c)                                             # (B, N, pf*ph*pw*C)
        return unpatchify(tokens, self.patch_size, (self.out_channels, *self.input_size))
