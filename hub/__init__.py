"""The course's JupyterHub on one machine (``make hub``): state, accounts, spawner, exchange.

See hub/README.md. Nothing here is imported by the notebooks or the grader; the student and
instructor servers import :mod:`hub.exchange` through their nbgrader configuration.
"""
