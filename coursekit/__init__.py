"""Small helpers shared by the course notebooks: runtime set-up, timing, data and plots."""

from coursekit.runtime import RuntimeInfo, describe, setup
from coursekit.timing import Timing, compare_timings, format_timings

__all__ = ["RuntimeInfo", "Timing", "compare_timings", "describe", "format_timings", "setup"]
