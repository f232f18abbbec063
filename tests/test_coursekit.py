"""Unit tests of the notebooks' helper package."""

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

import coursekit
from coursekit import data, plots
from coursekit.runtime import _threads_from_env, pick_device


def test_setup_sets_threads_and_seed(capsys, monkeypatch):
    monkeypatch.delenv("COURSE_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        info = coursekit.setup(seed=3)
        a = torch.randn(3)
        coursekit.setup(seed=3, quiet=True)
        assert torch.equal(a, torch.randn(3)), "setup(seed) must make torch reproducible"
        assert info.threads == 1 and torch.get_num_threads() == 1
        out = capsys.readouterr().out
        assert "threads=1" in out and torch.__version__ in out and "device=" in out
    finally:
        torch.set_num_threads(before)


def test_thread_count_from_env(monkeypatch):
    monkeypatch.setenv("COURSE_THREADS", "2")
    assert _threads_from_env(None) == 2
    monkeypatch.setenv("COURSE_THREADS", "two")
    with pytest.raises(ValueError, match="COURSE_THREADS"):
        _threads_from_env(None)
    with pytest.raises(ValueError, match="at least 1"):
        _threads_from_env(0)


def test_device_choice(monkeypatch):
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            pick_device("cuda")


def test_compare_timings_interleaves_and_reports():
    calls = []
    results = coursekit.compare_timings({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                        repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4, "methods must run interleaved, warm-up included"
    assert all(len(t.seconds) == 3 for t in results.values())
    table = coursekit.format_timings(results, baseline="a")
    assert "median" in table and "speedup vs a" in table and table.count("\n") == 2
    with pytest.raises(ValueError):
        coursekit.compare_timings({}, repeats=1)
    with pytest.raises(ValueError):
        coursekit.compare_timings({"a": lambda: None}, repeats=0)


def test_reversal_batch():
    g = torch.Generator().manual_seed(0)
    tokens, targets = data.reversal_batch(4, 6, 5, generator=g)
    assert tokens.shape == targets.shape == (4, 6)
    assert torch.equal(targets[:, 0], tokens[:, -1]) and torch.equal(targets.flip(1), tokens)
    with pytest.raises(ValueError, match="vocab_size"):
        data.reversal_batch(1, 3, 1)


def test_plots():
    ax = plots.attention_heatmap(torch.softmax(torch.randn(3, 4), -1), key_labels="abcd")
    assert ax.get_xlabel() == "key position"
    with pytest.raises(ValueError, match="2-D"):
        plots.attention_heatmap(torch.rand(2, 3, 4))
    ax = plots.loss_curve([3.0, 1.0, 0.1])
    assert ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="empty"):
        plots.loss_curve([])
