"""The course's one Transformer encoder, as chapter 03 builds it, for the chapters that reuse it.

Chapter 03 writes the encoder block by hand; later chapters (ViT, CLIP, ViLT, text matching) need the
same thing and import it from here instead of writing it again. The design is chapter 03's:

* a block is multi-head self-attention (``self_attn``, an ``nn.MultiheadAttention``) and a
  position-wise feed-forward network (``ffn.linear1``, ``ffn.linear2``), each wrapped in a residual
  connection and a layer norm (``norm1``, ``norm2``);
* **post-norm** (``norm_first=False``, the original Transformer and chapter 03's exercise):
  ``x = norm1(x + attn(x)); x = norm2(x + ffn(x))``;
  **pre-norm** (``norm_first=True``, ViT, CLIP, GPT-2): ``x = x + attn(norm1(x)); x = x + ffn(norm2(x))``,
  and a pre-norm stack ends with one more layer norm (``norm``), since its residual stream is never
  normalised otherwise;
* batch first: a batch of sequences is ``(B, T, d_model)``;
* masks follow the course's one convention, True = **may attend**: a key mask ``(B, T)`` is True at
  real tokens and False at padding, an attention mask ``(T, T)`` is True where query ``i`` may attend
  key ``j``. PyTorch's ``nn.MultiheadAttention`` uses the opposite (True = blocked); the conversion
  happens in one place, :func:`to_pytorch_mask`.

The attribute names are those of ``nn.TransformerEncoderLayer`` (``ffn.linear1`` is its ``linear1``),
so :func:`torch_encoder` builds the equivalent PyTorch stack with the same weights; the tests compare
the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass(frozen=True)
class EncoderConfig:
    """Sizes and variant of an encoder. The defaults are ``nn.TransformerEncoderLayer``'s variant
    (post-norm, ReLU), i.e. chapter 03's block; ViT and CLIP use ``norm_first=True, activation="gelu"``."""

    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 256
    n_layers: int = 2
    dropout: float = 0.0
    norm_first: bool = False
    activation: str = "relu"
    final_norm: bool | None = None  # a layer norm after the last block; None: exactly when norm_first
    eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "d_ff", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EncoderConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def has_final_norm(self) -> bool:
        return self.norm_first if self.final_norm is None else self.final_norm


class FeedForward(nn.Module):
    """``linear2(activation(linear1(x)))`` at every position: ``(..., d_model) -> (..., d_model)``."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(ACTIVATIONS[self.activation](self.linear1(x))))


def to_pytorch_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The course's mask (True = may attend) as PyTorch's ``key_padding_mask`` / ``attn_mask``
    (True = may NOT attend). None stays None."""
    return None if mask is None else ~mask


def _check_input(x: torch.Tensor, d_model: int, key_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
                 who: str) -> None:
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{who} expects (B, T, d_model={d_model}) inputs, got shape {tuple(x.shape)}")
    B, T = x.shape[:2]
    if key_mask is not None and (key_mask.shape != (B, T) or key_mask.dtype != torch.bool):
        raise ValueError(f"key_mask must be a bool tensor of shape (B, T) = {(B, T)} (True at real tokens), "
                         f"got {key_mask.dtype} {tuple(key_mask.shape)}")
    if attn_mask is not None and (attn_mask.shape != (T, T) or attn_mask.dtype != torch.bool):
        raise ValueError(f"attn_mask must be a bool tensor of shape (T, T) = {(T, T)} (True = may attend), "
                         f"got {attn_mask.dtype} {tuple(attn_mask.shape)}")


class EncoderBlock(nn.Module):
    """One encoder block, post-norm or pre-norm as ``config.norm_first`` says."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.self_attn = nn.MultiheadAttention(d, config.n_heads, dropout=config.dropout, batch_first=True)
        self.ffn = FeedForward(d, config.d_ff, config.activation, config.dropout)
        self.norm1 = nn.LayerNorm(d, eps=config.eps)
        self.norm2 = nn.LayerNorm(d, eps=config.eps)
        self.dropout1 = nn.Dropout(config.dropout)
        self.dropout2 = nn.Dropout(config.dropout)

    def _attend(self, h, key_mask, attn_mask, return_attention):
        # h: (B, T, d) -> (B, T, d); weights: (B, n_heads, T, T), each row sums to 1 over the keys
        out, weights = self.self_attn(h, h, h, key_padding_mask=to_pytorch_mask(key_mask),
                                      attn_mask=to_pytorch_mask(attn_mask), need_weights=return_attention,
                                      average_attn_weights=False)
        return self.dropout1(out), weights

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, return_attention: bool = False):
        """``x``: (B, T, d_model) -> (B, T, d_model); with ``return_attention`` also the attention
        weights (B, n_heads, T, T). ``key_mask``: (B, T), True at real tokens; ``attn_mask``: (T, T),
        True where query i may attend key j (e.g. a causal mask)."""
        _check_input(x, self.config.d_model, key_mask, attn_mask, "EncoderBlock")
        if self.config.norm_first:
            attended, weights = self._attend(self.norm1(x), key_mask, attn_mask, return_attention)
            x = x + attended                                           # (B, T, d)
            x = x + self.dropout2(self.ffn(self.norm2(x)))             # (B, T, d)
        else:
            attended, weights = self._attend(x, key_mask, attn_mask, return_attention)
            x = self.norm1(x + attended)                               # (B, T, d)
            x = self.norm2(x + self.dropout2(self.ffn(x)))             # (B, T, d)
        return (x, weights) if return_attention else x


class TransformerEncoder(nn.Module):
    """``config.n_layers`` blocks with their own weights, applied in order (and a final layer norm for
    a pre-norm stack): ``(B, T, d_model) -> (B, T, d_model)``."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([EncoderBlock(config) for _ in range(config.n_layers)])
        self.norm = nn.LayerNorm(config.d_model, eps=config.eps) if config.has_final_norm else nn.Identity()

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, return_attention: bool = False):
        """Masks as in :meth:`EncoderBlock.forward`; with ``return_attention`` also a list of every
        block's weights, each (B, n_heads, T, T)."""
        _check_input(x, self.config.d_model, key_mask, attn_mask, "TransformerEncoder")
        maps = []
        for block in self.layers:
            if return_attention:
                x, weights = block(x, key_mask, attn_mask, return_attention=True)
                maps.append(weights)
            else:
                x = block(x, key_mask, attn_mask)
        x = self.norm(x)
        return (x, maps) if return_attention else x


def torch_state_dict(encoder: TransformerEncoder) -> dict[str, torch.Tensor]:
    """The encoder's weights under ``nn.TransformerEncoder``'s names (``ffn.linear1`` -> ``linear1``)."""
    return {k.replace(".ffn.", "."): v for k, v in encoder.state_dict().items()}


def torch_encoder(config: EncoderConfig) -> nn.TransformerEncoder:
    """PyTorch's own encoder for the same config (fresh weights; load :func:`torch_state_dict` into it).

    Built with ``enable_nested_tensor=False``: the nested-tensor fast path would write zeros at padding
    positions, which this encoder computes like any other position. Its masks are PyTorch's (True =
    blocked): pass ``to_pytorch_mask(key_mask)`` as ``src_key_padding_mask``."""
    layer = nn.TransformerEncoderLayer(config.d_model, config.n_heads, config.d_ff, dropout=config.dropout,
                                       activation=config.activation, layer_norm_eps=config.eps,
                                       batch_first=True, norm_first=config.norm_first)
    norm = nn.LayerNorm(config.d_model, eps=config.eps) if config.has_final_norm else None
    return nn.TransformerEncoder(layer, config.n_layers, norm=norm, enable_nested_tensor=False)


def count_parameters(module: nn.Module) -> int:
    """The number of trainable parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
