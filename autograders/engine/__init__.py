"""The grading engine: the check framework, the sandbox and its runner, grading a class, release."""
