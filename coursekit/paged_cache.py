"""A paged key/value cache: fixed-size blocks from one shared pool, and a block table per sequence.

Serving engines store the KV cache of many requests this way (vLLM's PagedAttention, Kwon et al.,
SOSP 2023; TGI, SGLang and TensorRT-LLM page it too). Instead of one buffer of the maximum length per
request, the cache is a pool of *blocks* of ``block_size`` positions each; a request owns a list of
block ids, its **block table**, and position ``t`` of the request lives in block ``table[t //
block_size]`` at offset ``t % block_size``. Blocks are taken from a free list only when a request's
last block is full, and go back to it when the request finishes, so memory is reserved for tokens that
exist, not for tokens that might come: the waste is at most ``block_size - 1`` positions per request.

Layout: ``keys`` and ``values`` are ``(n_layer, num_blocks, n_kv_head, block_size, d_head)``; one block
table serves every layer (block ``b`` of layer ``l`` is ``keys[l, b]``), as in vLLM. Reading a request's
cache back in position order -- gathering its blocks in table order -- is chapter 7's exercise, so this
module writes and accounts, and leaves reading to the notebook.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


def blocks_needed(length: int, block_size: int) -> int:
    """How many blocks hold ``length`` positions: ``ceil(length / block_size)``."""
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise ValueError(f"length must be a non-negative integer, got {length!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    return -(-length // block_size)


def slot_mapping(block_table: Sequence[int] | torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat slot ``block * block_size + offset`` of each position (vLLM's ``slot_mapping``).

    ``block_table[i]`` is the block holding positions ``i * block_size .. (i + 1) * block_size - 1``.
    """
    table = torch.as_tensor(block_table, dtype=torch.long)
    positions = torch.as_tensor(positions, dtype=torch.long)
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= table.numel() * block_size):
        raise ValueError(f"positions must lie in 0 .. {table.numel() * block_size - 1} for a table of "
                         f"{table.numel()} block(s) of {block_size}")
    return table.to(positions.device)[positions // block_size] * block_size + positions % block_size


class PagedKVCache:
    """Keys and values of many sequences in one pool of blocks (see the module docstring).

    ``append(seq, k, v)`` adds the new positions of sequence ``seq`` (any hashable id; a new id starts a
    new sequence), taking blocks from the free list as needed; ``release(seq)`` gives its blocks back.
    ``block_tables[seq]`` and ``lengths[seq]`` describe where a sequence lives.
    """

    def __init__(self, n_layer: int, n_kv_head: int, d_head: int, block_size: int, num_blocks: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        for name, value in (("n_layer", n_layer), ("n_kv_head", n_kv_head), ("d_head", d_head),
                            ("block_size", block_size), ("num_blocks", num_blocks)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.n_layer, self.n_kv_head, self.d_head = n_layer, n_kv_head, d_head
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (n_layer, num_blocks, n_kv_head, block_size, d_head)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.free_blocks: list[int] = list(range(num_blocks))
        self.block_tables: dict[Hashable, list[int]] = {}
        self.lengths: dict[Hashable, int] = {}

    # -- writing -------------------------------------------------------------------------------

    def append(self, seq: Hashable, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the keys/values of ``T_new`` new positions of ``seq``: ``k`` and ``v`` are
        ``(n_layer, n_kv_head, T_new, d_head)``, positions continuing after the ones already cached."""
        expected = (self.n_layer, self.n_kv_head, self.d_head)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != expected:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must have shape (n_layer, n_kv_head, T_new, d_head) = "
                                 f"({expected[0]}, {expected[1]}, T_new, {expected[2]}), got {got}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        table = self.block_tables.setdefault(seq, [])
        start = self.lengths.setdefault(seq, 0)
        end = start + k.shape[2]
        missing = blocks_needed(end, self.block_size) - len(table)
        if missing > len(self.free_blocks):
            raise RuntimeError(f"out of KV blocks: sequence {seq!r} needs {missing} more, {len(self.free_blocks)} "
                               f"free of {self.num_blocks}")
        for _ in range(missing):
            table.append(self.free_blocks.pop(0))
        positions = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.long)[positions // self.block_size].to(self.keys.device)
        offsets = (positions % self.block_size).to(self.keys.device)
        # keys[:, blocks, :, offsets] has shape (T_new, n_layer, n_kv_head, d_head)
        self.keys[:, blocks, :, offsets] = k.permute(2, 0, 1, 3).to(self.keys.dtype)
        self.values[:, blocks, :, offsets] = v.permute(2, 0, 1, 3).to(self.values.dtype)
        self.lengths[seq] = end

    def release(self, seq: Hashable) -> None:
        """The sequence is finished: its blocks go back to the free list."""
        if seq not in self.block_tables:
            raise KeyError(f"no sequence {seq!r} in the cache")
        self.free_blocks.extend(self.block_tables.pop(seq))
        del self.lengths[seq]

    # -- accounting ----------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        """Bytes of one block: keys and values of ``block_size`` positions in every layer."""
        return 2 * self.n_layer * self.n_kv_head * self.block_size * self.d_head * self.keys.element_size()

    def bytes_reserved(self) -> int:
        """Bytes of the blocks that sequences own now (full or partly filled)."""
        return sum(len(t) for t in self.block_tables.values()) * self.block_bytes

    def bytes_used(self) -> int:
        """Bytes that hold a cached position (the rest of the reserved blocks is waste)."""
        return sum(self.lengths.values()) * self.block_bytes // self.block_size

    def pool_bytes(self) -> int:
        """Bytes of the whole pool, free blocks included (what was allocated)."""
        return self.keys.nbytes + self.values.nbytes
