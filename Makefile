# Two commands on a fresh machine: `make train` and `make test`. Both create .venv if missing.
# make test: the fast tier (not slow, 2 workers); make test-full: everything (what .ci/run runs).
# One torch thread per process: 2 workers (and the processes they start) on 2 cores, not 4 threads
# fighting over them (the suite ran 18% faster).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test test-full bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,mlflow]'
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) train.py resume=auto $(ARGS)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m "not slow" $(ARGS)

test-full: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --durations=15 $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
