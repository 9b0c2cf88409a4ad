# Every target sets up its own environment: a fresh clone needs only Python >= 3.11 and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test chaos lint typecheck check clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,demo]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fl_orchestrator.demo

test: $(STAMP)
	$(PY) -m pytest -q

# The long crash-safety run: 100 random kill -9s instead of the suite's 20.
chaos: $(STAMP)
	CHAOS_KILLS=100 $(PY) -m pytest -q -s tests/test_chaos.py

lint: $(STAMP)
	$(VENV)/bin/ruff check fl_orchestrator tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .demo
