"""nbgrader configuration for the course (the repository root is the course directory).

solutions/<chapter>/  instructor notebooks (nbgrader's "source")
chapters/<chapter>/   student notebooks generated from them (nbgrader's "release"), committed
submitted/, autograded/, feedback/, gradebook.db   an instructor's grading state (git-ignored)
"""

c = get_config()  # noqa: F821 (provided by nbgrader)

c.CourseDirectory.course_id = "attention-to-sora"
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "chapters"
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "*.egg-info"]

c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

# A chapter runs in under a minute; one cell may train for a while on a slow laptop.
c.ExecutePreprocessor.timeout = 600
c.ExecutePreprocessor.interrupt_on_timeout = True

# `nbgrader autograde` restores the hidden tests of released test cells without a "checksum has
# changed" warning per cell (other changes are still reported); see autograders/engine/nbgrader_ext.py.
from nbgrader.preprocessors import CheckCellMetadata, ClearOutput, DeduplicateIds, OverwriteKernelspec  # noqa: E402

from autograders.engine.nbgrader_ext import OverwriteCellsQuietly, SkipDemoCells  # noqa: E402

# Cells tagged skip-in-grading (training runs, timing demos) are not run, as in `make grade`.
c.Autograde.sanitize_preprocessors = [ClearOutput, DeduplicateIds, OverwriteKernelspec, OverwriteCellsQuietly,
                                      SkipDemoCells, CheckCellMetadata]

# `nbgrader generate_feedback` pages render math offline: MathJax is inlined from the pinned wheel.
from autograders.engine.nbgrader_ext import feedback_template_dirs  # noqa: E402

c.HTMLExporter.template_name = "course_feedback"
c.HTMLExporter.extra_template_basedirs = feedback_template_dirs()
