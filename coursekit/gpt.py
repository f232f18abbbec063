"""A small decoder-only GPT with an optional key/value cache, shared by the inference chapters.

Pre-norm blocks (LayerNorm -> causal self-attention -> residual, LayerNorm -> MLP -> residual),
learned position embeddings, and an output head tied to the token embedding. Attention supports
multi-head (``n_kv_head == n_head``), grouped-query (``n_kv_head`` a divisor of ``n_head``) and
multi-query (``n_kv_head == 1``) attention; it runs through ``F.scaled_dot_product_attention``.

The cache is the plainest one: for every layer a pair ``(k, v)`` of shape
``(B, n_kv_head, T_seen, d_head)``; a forward call with ``use_cache=True`` appends the new keys and
values along the time axis and returns the longer pair. Positions of the new tokens continue after
``T_seen``.

``generate(..., use_cache=True)`` decodes with a leaner version of the same cache, ``StaticKVCache``:
the buffers for the whole generation are allocated once and every step writes its one new key and
value in place (no copy of the whole cache per step), and ``decode_step`` runs one token through the
same parameters with plain functional calls, computing the logits of that token only. It gives the
logits of ``forward(token, past=..., use_cache=True)`` (to float rounding) and the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None -> n_head (MHA); 1 -> MQA; a divisor of n_head -> GQA
    max_len: int = 1024

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        kv = self.n_kv_head
        if kv is not None:
            if not isinstance(kv, int) or isinstance(kv, bool) or kv < 1:
                raise ValueError(f"GPTConfig.n_kv_head must be None or a positive integer, got {kv!r}")
            if kv > self.n_head or self.n_head % kv:
                raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({kv}): "
                                 f"each group of query heads shares one key/value head")

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads (``n_head`` when ``n_kv_head`` is None)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head


class CausalSelfAttention(nn.Module):
    """Causal self-attention with ``n_head`` query heads and ``kv_heads`` key/value heads."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.d_head = config.d_head
        # One matrix for Q, K and V together: one matmul per step instead of three.
        self.qkv = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.d_head)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, d_model) -> q (B, n_head, T, d_head), k and v (B, n_kv_head, T, d_head)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.d_head, self.n_kv_head * self.d_head, self.n_kv_head * self.d_head], dim=-1)
        q = q.view(B, T, self.n_head, self.d_head).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.d_head).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.d_head).transpose(1, 2)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of the last ``q.shape[2]`` positions over all ``k.shape[2]`` keys.

        Query ``i`` sits at position ``T_k - T_q + i`` and may see keys ``0 .. T_k - T_q + i``.
        Returns (B, T_q, d_model) before the output projection.
        """
        B, _, T_q, _ = q.shape
        T_k = k.shape[2]
        gqa = self.n_kv_head != self.n_head
        if T_q == 1:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)  # the newest token sees all
        elif T_q == T_k:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            mask = torch.ones(T_q, T_k, dtype=torch.bool, device=q.device).tril(diagonal=T_k - T_q)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(B, T_q, self.n_head * self.d_head)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        q, k, v = self.project_qkv(x)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        return self.proj(self.attend(q, k, v)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.proj = nn.Linear(4 * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self.attn(self.ln_1(x), past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


class GPT(nn.Module):
    """Decoder-only transformer language model: token ids (B, T) -> next-token logits (B, T, vocab)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig, got a {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied input and output embeddings
        self.apply(self._init_weights)
        for block in self.blocks:  # GPT-2's scaled init of the layers that write into the residual
            for layer in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_inputs(self, idx: torch.Tensor, past: KVCache | None) -> int:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be a (batch, time) tensor of token ids, got {shape}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must hold integer token ids (torch.long), got {idx.dtype}")
        if idx.shape[1] < 1:
            raise ValueError("idx must hold at least one token per sequence")
        t_past = 0
        if past is not None:
            if len(past) != self.config.n_layer:
                raise ValueError(f"past must hold one (k, v) pair per layer ({self.config.n_layer}), "
                                 f"got {len(past)}")
            k = past[0][0]
            expected = (idx.shape[0], self.config.kv_heads, k.shape[2], self.config.d_head)
            if tuple(k.shape) != expected:
                raise ValueError(f"cached keys must have shape (B, n_kv_head, T_past, d_head) = {expected}, "
                                 f"got {tuple(k.shape)}")
            t_past = k.shape[2]
        if t_past + idx.shape[1] > self.config.max_len:
            raise ValueError(f"sequence of {t_past + idx.shape[1]} tokens ({t_past} cached + "
                             f"{idx.shape[1]} new) is longer than max_len={self.config.max_len}")
        return t_past

    def forward(self, idx: torch.LongTensor, past: KVCache | None = None, use_cache: bool = False
                ) -> tuple[torch.Tensor, KVCache | None]:
        """idx (B, T) -> logits (B, T, vocab).

        With ``use_cache`` also returns the per-layer ``(k, v)`` of shape
        ``(B, n_kv_head, T_past + T, d_head)``; the new tokens' positions continue after ``T_past``.
        """
        t_past = self._check_inputs(idx, past)
        T = idx.shape[1]
        pos = torch.arange(t_past, t_past + T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        present: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past is None else past[i])
            present.append(kv)
        logits = self.head(self.ln_f(x))
        return logits, (present if use_cache else None)


class StaticKVCache:
    """Key/value buffers allocated once for a whole generation, filled in place.

    ``keys[i]`` and ``values[i]`` have shape ``(B, n_kv_head, capacity, d_head)``; positions
    ``0 .. length - 1`` hold the cache, the rest is not yet written. ``layers()`` gives the filled part
    in the layout of ``GPT.forward``'s ``past`` (views, no copy).
    """

    def __init__(self, past: KVCache, capacity: int):
        if not past:
            raise ValueError("past must hold one (k, v) pair per layer")
        k0 = past[0][0]
        B, n_kv, length, d_head = k0.shape
        if not isinstance(capacity, int) or capacity < length:
            raise ValueError(f"capacity must be an integer >= the {length} cached positions, got {capacity!r}")
        self.length = length
        self.capacity = capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for k, v in past:
            kb = k.new_empty(B, n_kv, capacity, d_head)
            vb = v.new_empty(B, n_kv, capacity, d_head)
            kb[:, :, :length].copy_(k)
            vb[:, :, :length].copy_(v)
            self.keys.append(kb)
            self.values.append(vb)

    def layers(self) -> KVCache:
        return [(k[:, :, :self.length], v[:, :, :self.length]) for k, v in zip(self.keys, self.values)]


def _block_params(model: GPT) -> list[tuple]:
    """The parameters decode_step reads, looked up once (nn.Module attribute access is slow)."""
    return [(b.ln_1.weight, b.ln_1.bias, b.ln_1.eps, b.attn.qkv.weight, b.attn.qkv.bias,
             b.attn.proj.weight, b.attn.proj.bias, b.ln_2.weight, b.ln_2.bias, b.ln_2.eps,
             b.mlp.fc.weight, b.mlp.fc.bias, b.mlp.proj.weight, b.mlp.proj.bias) for b in model.blocks]


def decode_step(model: GPT, token: torch.Tensor, cache: StaticKVCache, params: list[tuple] | None = None
                ) -> torch.Tensor:
    """One decoding step: token ids (B,) at position ``cache.length`` -> next-token logits (B, vocab).

    The same computation as ``model(token[:, None], past=cache.layers(), use_cache=True)`` for one
    token, written as functional calls on 2-D (B, d_model) activations: the new key and value go
    straight into the preallocated buffers, attention reads the filled prefix (a single query may see
    every cached key, so no mask), and the head runs on this one position. Advances ``cache.length``.
    ``params`` is ``_block_params(model)``, precomputed by a caller that runs many steps.
    """
    cfg = model.config
    t = cache.length
    if t >= cache.capacity or t >= cfg.max_len:
        raise ValueError(f"the cache is full ({t} of {min(cache.capacity, cfg.max_len)} positions)")
    B = token.shape[0]
    H, KV, D, d = cfg.n_head, cfg.kv_heads, cfg.d_head, cfg.d_model
    shape, n_q, n_kv = (d,), H * D, KV * D
    gqa = H != KV
    x = model.tok_emb(token) + model.pos_emb.weight[t]
    for (l1w, l1b, e1, qkv_w, qkv_b, pw, pb, l2w, l2b, e2, fw, fb, mw, mb), kb, vb in zip(
            params if params is not None else _block_params(model), cache.keys, cache.values):
        q, k, v = F.linear(F.layer_norm(x, shape, l1w, l1b, e1), qkv_w, qkv_b).split([n_q, n_kv, n_kv], dim=-1)
        kb[:, :, t].copy_(k.view(B, KV, D))
        vb[:, :, t].copy_(v.view(B, KV, D))
        a = F.scaled_dot_product_attention(q.view(B, H, 1, D), kb[:, :, :t + 1], vb[:, :, :t + 1], enable_gqa=gqa)
        x = x + F.linear(a.view(B, n_q), pw, pb)
        x = x + F.linear(F.gelu(F.linear(F.layer_norm(x, shape, l2w, l2b, e2), fw, fb)), mw, mb)
    cache.length = t + 1
    ln_f = model.ln_f
    return model.head(F.layer_norm(x, shape, ln_f.weight, ln_f.bias, ln_f.eps))


@torch.no_grad()
def generate(model: GPT, idx: torch.LongTensor, max_new_tokens: int, use_cache: bool = True) -> torch.LongTensor:
    """Greedy decoding; returns (B, T + max_new_tokens).

    Without the cache every step runs the model on the whole sequence so far; with it, the prompt
    is run once (prefill) and every later step feeds one token and writes its keys and values into
    buffers allocated once for the whole generation (``StaticKVCache``, ``decode_step``).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] < 1:
        raise ValueError(f"idx must be a (batch, time) tensor with at least one token, got "
                         f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
    total = idx.shape[1] + max_new_tokens
    if total > model.config.max_len:
        raise ValueError(f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds max_len={model.config.max_len}")
    out = idx
    if max_new_tokens == 0:
        return out
    if not use_cache:
        for _ in range(max_new_tokens):
            logits, _ = model(out)
            out = torch.cat([out, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
        return out
    with torch.inference_mode():  # no autograd bookkeeping at all in the decode loop
        logits, past = model(idx, use_cache=True)  # prefill: the whole prompt at once
        cache = StaticKVCache(past, capacity=total - 1)  # the last new token is never fed back
        params = _block_params(model)
        token = logits[:, -1].argmax(dim=-1)
        tokens = [token]
        for _ in range(max_new_tokens - 1):  # decode: one token in, its K and V written in place
            token = decode_step(model, token, cache, params).argmax(dim=-1)
            tokens.append(token)
    return torch.cat([idx, torch.stack(tokens, dim=1)], dim=1)  # outside inference mode: a normal tensor


def kv_cache_bytes(config: GPTConfig, batch: int, seq_len: int, bytes_per_element: int = 4) -> int:
    """Bytes held by the cache: keys and values, every layer, ``kv_heads * d_head`` numbers per token."""
    for name, value in (("batch", batch), ("seq_len", seq_len), ("bytes_per_element", bytes_per_element)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return 2 * config.n_layer * batch * config.kv_heads * seq_len * config.d_head * bytes_per_element
