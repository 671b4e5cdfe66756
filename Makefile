# Set-up and the README's commands. TORCH_SPEC picks the torch build: the CPU wheel by
# default; GPU users pass e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cl-runner-installed

.PHONY: install run test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install -q $(TORCH_SPEC) numpy
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

run: install
	$(VENV)/bin/cl-run $(ARGS)

test: install
	$(PY) -m pytest -q -x --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) scripts/bench_projection.py
	$(PY) scripts/bench_subspace.py

clean:
	rm -rf build *.egg-info cl_runner/ops/_C*.so
