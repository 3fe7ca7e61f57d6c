# Two commands on a fresh machine:  `make demo`  (set up + run the example)  and  `make test`.
PYTHON ?= python3
# torch is installed only when missing, so a torch the user already has (CUDA or not) is kept.
# On these machines torch==2.13.0 is a local CPU wheel; elsewhere point TORCH_INDEX at a CPU
# index, e.g. make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP = $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: setup demo test check lint typecheck docs docs-serve wheel-check pytest bench

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) -e ".[test,docs,dev]"

demo: setup
	$(PYTHON) examples/quickstart.py

# What CI runs (bash .ci/run): lint, types, the documentation site, the wheel on its own, the tests.
test: setup check pytest

check: lint typecheck docs wheel-check

lint:
	$(PYTHON) -m ruff check ww_monitor tests examples benchmarks
	$(PYTHON) -m ruff format --check ww_monitor

typecheck:
	$(PYTHON) -m mypy

# The site goes to site/; --strict fails on a broken link, a missing page or a docstring griffe cannot read.
docs:
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict --site-dir site

docs-serve:
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs serve

# Build sdist + wheel, check their metadata, install the wheel into a fresh virtual environment
# outside the checkout and run the quickstart and the CLI from it.
wheel-check:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" TORCH_INDEX="$(TORCH_INDEX)" bash .ci/wheel_check.sh

pytest:
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) benchmarks/bench_analyze.py
	$(PYTHON) benchmarks/bench_eigensolver.py
	$(PYTHON) benchmarks/bench_callback.py
	$(PYTHON) benchmarks/bench_classify.py
