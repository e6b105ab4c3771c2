# Set-up and main commands. `make run` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/tiny

.PHONY: run test test-fast bench clean

# Rebuilt whenever the dependency pins change.
$(VENV): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(VENV)

run: $(VENV)
	$(PY) -m experiments.train --config=experiments/configs/train.py:tiny --workdir=$(WORKDIR)

test: $(VENV)
	$(PY) -m pytest -q tests

test-fast: $(VENV)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(VENV)
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/fit_speed.py

clean:
	rm -rf $(VENV) runs
