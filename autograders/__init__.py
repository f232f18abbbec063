"""Graded checks for the course notebooks, one module per chapter, and the grading command.

Test cells call ``<chapter module>.check(name, implementation)``; see :mod:`autograders.engine.core`.
"""
