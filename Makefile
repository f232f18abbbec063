# From Attention to Sora -- the two commands a new user needs are `make lab` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHAPTER ?=
# Tests run on both cores of the CI machine; each notebook keeps to one torch thread (coursekit).
TEST_WORKERS ?= 2
# Programs of the environment (jupyter, nbgrader, alembic) come first on the PATH of every recipe.
export PATH := $(abspath $(VENV))/bin:$(PATH)

SUBMISSIONS ?=
GRADE_WORKERS ?= 2

.PHONY: help setup work lab instructor validate assignment test test-fast release book bench grade clean

help:
	@echo "make lab      set up if needed, copy new chapters into work/ (never overwriting), JupyterLab on work/"
	@echo "make validate NOTEBOOK=work/01_self_attention/self_attention.ipynb   run a notebook's visible checks"
	@echo "make instructor   JupyterLab with nbgrader's instructor tools (formgrader) on the course directory"
	@echo "make hub      JupyterHub for a class on 127.0.0.1:8000 (sudo: a Unix uid per student; see hub/README.md)"
	@echo "make assignment CHAPTER=01_self_attention   record a chapter in gradebook.db (chapters/ untouched)"
	@echo "make test     set up if needed, then the whole test suite"
	@echo "make release  regenerate chapters/ from solutions/ (CHAPTER=NN_name for one)"
	@echo "make book     build the book: _build/student/index.html (no solutions) and _build/instructor/"
	@echo "make bench    time every solution notebook, then the attention, KV-cache and MoE benchmarks"
	@echo "              -> benchmarks/results/ (a few minutes; CHAPTER=NN_name times one notebook only)"
	@echo "make grade SUBMISSIONS=submitted/ CHAPTER=01_self_attention   sandboxed grading of a class"

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@# The grading sandbox (make grade, tests/test_grading.py) uses bubblewrap; install it when we can.
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -qq bubblewrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq bubblewrap; }; } \
		|| echo "note: bubblewrap is not installed: grading runs without namespace isolation"; }
	touch $(STAMP)

setup: $(STAMP)

work: $(STAMP)
	@$(PY) tools/workspace.py

# Students get student tools only (no formgrader, no exchange): config/student/ disables the rest.
lab: work
	JUPYTER_CONFIG_DIR=$(CURDIR)/config/student $(VENV)/bin/jupyter lab --ServerApp.ip=127.0.0.1 \
		--ServerApp.port=8888 --no-browser --allow-root --ServerApp.root_dir=work

instructor: $(STAMP)
	JUPYTER_CONFIG_DIR=$(CURDIR)/config/instructor $(VENV)/bin/jupyter lab --ServerApp.ip=127.0.0.1 \
		--ServerApp.port=8889 --no-browser --allow-root --ServerApp.root_dir=$(CURDIR)

# The course's JupyterHub for a class (hub/README.md); HUB_PORT, HUB_ROSTER, HUB_INSTRUCTOR from the environment.
.PHONY: hub
hub: $(STAMP)
	$(PY) tools/hub.py

NOTEBOOK ?=
validate: $(STAMP)
	@test -n "$(NOTEBOOK)" || { echo "usage: make validate NOTEBOOK=work/01_self_attention/self_attention.ipynb"; exit 2; }
	$(PY) -m autograders.engine.validate $(NOTEBOOK)

assignment: $(STAMP)
	@test -n "$(CHAPTER)" || { echo "usage: make assignment CHAPTER=01_self_attention"; exit 2; }
	$(PY) -m autograders.engine.assignment $(CHAPTER)

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -p no:nbval tests

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" -p no:nbval tests

release: $(STAMP)
	$(PY) -m autograders.engine.release $(CHAPTER)

book: $(STAMP)
	$(PY) tools/build_book.py

bench: $(STAMP)
	$(PY) benchmarks/notebooks.py $(CHAPTER)
	@if [ -z "$(CHAPTER)" ]; then \
		$(PY) benchmarks/attention.py && $(PY) benchmarks/kv_cache.py && $(PY) benchmarks/moe.py; fi

grade: $(STAMP)
	@test -n "$(SUBMISSIONS)" -a -n "$(CHAPTER)" || { echo "usage: make grade SUBMISSIONS=submitted/ CHAPTER=01_self_attention"; exit 2; }
	$(PY) -m autograders.engine.grade --submissions $(SUBMISSIONS) --chapter $(CHAPTER) --workers $(GRADE_WORKERS)

clean:
	rm -rf _build .pytest_cache
