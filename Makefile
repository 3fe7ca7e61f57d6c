# Two commands on a fresh machine:  `make demo`  (set up + run the example)  and  `make test`.
PYTHON ?= python3
# torch is installed only when missing, so a torch the user already has (CUDA or not) is kept.
# On these machines torch==2.13.0 is a local CPU wheel; elsewhere point TORCH_INDEX at a CPU
# index, e.g. make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP = $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: setup demo test bench

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) -e ".[test]"

demo: setup
	$(PYTHON) examples/quickstart.py

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) benchmarks/bench_analyze.py
	$(PYTHON) benchmarks/bench_eigensolver.py
	$(PYTHON) benchmarks/bench_callback.py
	$(PYTHON) benchmarks/bench_classify.py
