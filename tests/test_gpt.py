"""Unit tests of coursekit.gpt: the shared small GPT with a key/value cache."""

import pytest
import torch

from coursekit.gpt import GPT, GPTConfig, StaticKVCache, decode_step, generate, kv_cache_bytes


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = GPTConfig(**{"vocab_size": 17, "d_model": 32, "n_layer": 2, "n_head": 4, "max_len": 64, **kwargs})
    return GPT(config).eval()


@pytest.mark.parametrize("n_kv_head", [None, 2, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_and_uncached_generation_agree(seed, n_kv_head):
    model = _model(seed, n_kv_head=n_kv_head)
    prompt = torch.randint(0, 17, (3, 5), generator=torch.Generator().manual_seed(seed))
    with_cache = generate(model, prompt, 20, use_cache=True)
    without = generate(model, prompt, 20, use_cache=False)
    assert with_cache.shape == (3, 25)
    assert torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("n_kv_head", [None, 2, 1])
def test_cached_logits_equal_full_recomputation(n_kv_head):
    model = _model(3, n_kv_head=n_kv_head)
    idx = torch.randint(0, 17, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = model(idx)
        # prefill 5 tokens, then a chunk of 4 (needs the offset causal mask), then one at a time
        l1, past = model(idx[:, :5], use_cache=True)
        l2, past = model(idx[:, 5:9], past=past, use_cache=True)
        steps = [l1, l2]
        for t in range(9, 12):
            lt, past = model(idx[:, t:t + 1], past=past, use_cache=True)
            steps.append(lt)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert len(past) == 2
    kv = model.config.kv_heads
    assert all(k.shape == v.shape == (2, kv, 12, 8) for k, v in past)


def test_forward_without_cache_returns_none_and_shapes():
    model = _model()
    logits, past = model(torch.zeros(2, 7, dtype=torch.long))
    assert logits.shape == (2, 7, 17) and past is None


@pytest.mark.parametrize("n_kv_head,expected", [(None, 4), (4, 4), (2, 2), (1, 1)])
def test_gqa_mqa_cache_shapes_and_bytes(n_kv_head, expected):
    model = _model(n_kv_head=n_kv_head)
    _, past = model(torch.zeros(1, 6, dtype=torch.long), use_cache=True)
    assert model.config.kv_heads == expected
    assert past[0][0].shape == (1, expected, 6, 8)
    measured = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in past)
    assert kv_cache_bytes(model.config, batch=1, seq_len=6) == measured
    assert kv_cache_bytes(model.config, batch=3, seq_len=6, bytes_per_element=2) == 3 * measured // 2


def test_fewer_kv_heads_means_fewer_parameters():
    mha, gqa, mqa = (_model(n_kv_head=h).num_parameters() for h in (None, 2, 1))
    assert mha > gqa > mqa


@pytest.mark.parametrize("kwargs,match", [
    ({"d_model": 30, "n_head": 4}, "divisible by n_head"),
    ({"n_head": 4, "n_kv_head": 3}, "divisible by n_kv_head"),
    ({"n_head": 4, "n_kv_head": 8}, "divisible by n_kv_head"),
    ({"n_kv_head": 0}, "n_kv_head"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"max_len": -1}, "max_len"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{"vocab_size": 10, "d_model": 32, **kwargs})


def test_bad_inputs():
    model = _model()
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="batch, time"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 5))
    _, past = model(torch.zeros(1, 60, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match="60 cached"):
        model(torch.zeros(1, 5, dtype=torch.long), past=past)
    with pytest.raises(ValueError, match="one \\(k, v\\) pair per layer"):
        model(torch.zeros(1, 1, dtype=torch.long), past=past[:1])
    with pytest.raises(ValueError, match="exceeds max_len"):
        generate(model, torch.zeros(1, 10, dtype=torch.long), 60)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.zeros(1, 10, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="seq_len"):
        kv_cache_bytes(model.config, batch=1, seq_len=-3)
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT({"vocab_size": 10})


def test_generate_zero_new_tokens_returns_prompt():
    model = _model()
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(model, prompt, 0), prompt)


@pytest.mark.parametrize("n_kv_head", [None, 2, 1])
def test_decode_step_matches_forward_with_past(n_kv_head):
    model = _model(4, n_kv_head=n_kv_head)
    idx = torch.randint(0, 17, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, past = model(idx[:, :4], use_cache=True)
        cache = StaticKVCache(past, capacity=11)
        assert cache.length == 4 and cache.keys[0].shape == (2, model.config.kv_heads, 11, 8)
        for t in range(4, 11):
            expected, past = model(idx[:, t:t + 1], past=past, use_cache=True)
            got = decode_step(model, idx[:, t], cache)
            assert got.shape == (2, 17)
            torch.testing.assert_close(got, expected[:, -1], atol=1e-5, rtol=1e-5)
            assert cache.length == t + 1
            for (k, v), (k_ref, v_ref) in zip(cache.layers(), past):
                assert k.shape == k_ref.shape == (2, model.config.kv_heads, t + 1, 8)
                torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="full"):
            decode_step(model, idx[:, 0], cache)


def test_static_cache_rejects_a_capacity_below_its_length():
    model = _model()
    with torch.no_grad():
        _, past = model(torch.zeros(1, 6, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match="capacity"):
        StaticKVCache(past, capacity=5)


def test_cached_generation_up_to_max_len_and_one_token():
    model = _model(5)
    prompt = torch.randint(0, 17, (2, 3), generator=torch.Generator().manual_seed(2))
    assert torch.equal(generate(model, prompt, 61), generate(model, prompt, 61, use_cache=False))
    assert torch.equal(generate(model, prompt, 1), generate(model, prompt, 1, use_cache=False))


def test_cached_generation_returns_an_ordinary_tensor():
    # the decode loop runs in inference mode; its output must still be usable for training
    model = _model()
    out = generate(model, torch.tensor([[1, 2, 3]]), 5)
    assert not out.is_inference() and out.dtype == torch.long
    logits, _ = model(out)
    logits.sum().backward()
    assert model.tok_emb.weight.grad is not None
