"""Per-chapter tasks: the inputs, calls and rules of each exercise (what the grading sandbox sees)."""
