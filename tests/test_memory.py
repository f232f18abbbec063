"""coursekit.memory: peak memory of one call in a fresh process."""

from __future__ import annotations

import pytest
import torch

from coursekit.memory import PeakMemory, format_bytes, peak_memory, source_of

MiB = 1024 ** 2
WARM = "torch.ones(1000).sum()"  # touches the code paths once, so the baseline includes them


def test_measures_the_allocation_of_the_call_only():
    # 40 MB made during the call; 80 MB made in setup belong to the baseline, not to the call.
    result = peak_memory("x = torch.ones(10_000_000)", setup="y = torch.ones(20_000_000)", warmup=WARM)
    assert isinstance(result, PeakMemory)
    assert 38 * MiB <= result.extra <= 44 * MiB, result
    assert result.baseline > 80 * MiB, "the inputs made in setup belong to the baseline"


def test_each_call_is_a_fresh_process():
    """A big earlier measurement must not raise the peak of a later small one (as ru_maxrss would)."""
    peak_memory("x = torch.ones(50_000_000)", warmup=WARM)
    small = peak_memory("x = torch.ones(1_000_000)", warmup=WARM)
    assert small.extra <= 8 * MiB, small


def test_temporaries_count_at_their_peak():
    # (a + 1) makes a 40 MB temporary while a and the result are alive: about 80 MB on top of a.
    result = peak_memory("b = (a + 1) * 2", setup="a = torch.ones(10_000_000)", warmup=WARM)
    # Without the temporary it would be ~40 MB; the allocator adds a few MB of slack on top of 80.
    assert 75 * MiB <= result.extra <= 100 * MiB, result


def helper(n):
    return torch.ones(n)


class Maker:
    @staticmethod
    def make(n):
        return torch.zeros(n) + 1


def test_functions_travel_as_source():
    result = peak_memory("x = helper(5_000_000) + Maker.make(5_000_000)", functions=[helper, Maker],
                         warmup="helper(10); Maker.make(10)")
    assert 50 * MiB <= result.extra <= 65 * MiB, result
    assert "def helper" in source_of(helper) and "class Maker" in source_of(Maker)


def test_threads_are_set_in_the_child():
    result = peak_memory("assert torch.get_num_threads() == 1", threads=1)
    assert result.peak >= result.baseline


def test_errors_are_raised_again():
    with pytest.raises(NotImplementedError, match="stub"):
        peak_memory("raise NotImplementedError('stub')")
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        peak_memory("1 / 0")
    with pytest.raises(RuntimeError, match="NameError"):
        peak_memory("undefined_function()")


def test_bad_arguments_are_rejected():
    with pytest.raises(TypeError, match="stmt"):
        peak_memory(lambda: None)
    with pytest.raises(ValueError, match="empty"):
        peak_memory("   ")
    with pytest.raises(ValueError, match="threads"):
        peak_memory("pass", threads=0)
    with pytest.raises(TypeError, match="function or a class"):
        source_of(42)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * MiB) == "3.0 MiB"
    assert format_bytes(5 * 1024 ** 3) == "5.0 GiB"
    assert "peak extra memory 1.0 MiB" in str(PeakMemory(MiB, 2 * MiB, "cpu"))
