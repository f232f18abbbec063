"""Unit tests of coursekit.paged_cache: blocks, block tables, the free list and the byte accounting."""

import pytest
import torch

from coursekit.paged_cache import PagedKVCache, blocks_needed, slot_mapping


def read_back(cache: PagedKVCache, seq):
    """The test's own reader: position by position, through the block table (slow, obviously right)."""
    table, length, bs = cache.block_tables[seq], cache.lengths[seq], cache.block_size
    k = torch.stack([cache.keys[:, table[t // bs], :, t % bs] for t in range(length)], dim=2)
    v = torch.stack([cache.values[:, table[t // bs], :, t % bs] for t in range(length)], dim=2)
    return k, v  # (n_layer, n_kv_head, length, d_head)


def test_blocks_needed():
    assert [blocks_needed(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="block_size"):
        blocks_needed(3, 0)
    with pytest.raises(ValueError, match="length"):
        blocks_needed(-1, 4)


def test_slot_mapping():
    slots = slot_mapping([5, 2, 7], torch.arange(10), 4)
    assert slots.tolist() == [20, 21, 22, 23, 8, 9, 10, 11, 28, 29]
    with pytest.raises(ValueError, match="positions"):
        slot_mapping([5], torch.tensor([4]), 4)


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_interleaved_sequences_read_back_in_order(block_size):
    g = torch.Generator().manual_seed(block_size)
    cache = PagedKVCache(n_layer=2, n_kv_head=3, d_head=5, block_size=block_size, num_blocks=64)
    full = {}
    # three requests written in turns: a prompt each, then tokens one at a time, interleaved
    for seq, prompt in (("a", 7), ("b", 2), ("c", 11)):
        k, v = torch.randn(2, 3, prompt, 5, generator=g), torch.randn(2, 3, prompt, 5, generator=g)
        cache.append(seq, k, v)
        full[seq] = (k, v)
    for _ in range(6):
        for seq in ("a", "b", "c"):
            k, v = torch.randn(2, 3, 1, 5, generator=g), torch.randn(2, 3, 1, 5, generator=g)
            cache.append(seq, k, v)
            full[seq] = (torch.cat([full[seq][0], k], 2), torch.cat([full[seq][1], v], 2))
    for seq, (k, v) in full.items():
        assert cache.lengths[seq] == k.shape[2]
        assert len(cache.block_tables[seq]) == blocks_needed(k.shape[2], block_size)
        got_k, got_v = read_back(cache, seq)
        assert torch.equal(got_k, k) and torch.equal(got_v, v)
    tables = [b for t in cache.block_tables.values() for b in t]
    assert len(tables) == len(set(tables)), "a block belongs to one sequence only"
    if block_size <= 4:  # blocks are handed out as needed, so an interleaved request's blocks are not adjacent
        table = cache.block_tables["a"]
        assert any(b - a != 1 for a, b in zip(table, table[1:])), table


def test_accounting_and_release():
    cache = PagedKVCache(n_layer=2, n_kv_head=2, d_head=4, block_size=4, num_blocks=5)
    assert cache.block_bytes == 2 * 2 * 2 * 4 * 4 * 4
    assert cache.pool_bytes() == 5 * cache.block_bytes
    cache.append(0, torch.zeros(2, 2, 5, 4), torch.zeros(2, 2, 5, 4))  # 5 positions -> 2 blocks
    assert cache.bytes_reserved() == 2 * cache.block_bytes
    assert cache.bytes_used() == 5 * cache.block_bytes // 4
    cache.append(1, torch.zeros(2, 2, 12, 4), torch.zeros(2, 2, 12, 4))  # 3 blocks: the pool is full
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        cache.append(0, torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 4))
    cache.release(1)
    assert len(cache.free_blocks) == 3 and 1 not in cache.block_tables
    cache.append(0, torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 4))  # now it fits
    assert cache.lengths[0] == 9 and len(cache.block_tables[0]) == 3
    with pytest.raises(KeyError):
        cache.release("nope")


def test_bad_shapes_are_explained():
    cache = PagedKVCache(n_layer=2, n_kv_head=2, d_head=4, block_size=4, num_blocks=5)
    with pytest.raises(ValueError, match="n_layer, n_kv_head, T_new, d_head"):
        cache.append(0, torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4))
    with pytest.raises(ValueError, match="same shape"):
        cache.append(0, torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 2, 4))
    with pytest.raises(ValueError, match="num_blocks"):
        PagedKVCache(2, 2, 4, 4, 0)
