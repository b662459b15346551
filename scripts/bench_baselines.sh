#!/usr/bin/env bash
# The papers' other baselines (docs/results.md (history: docs/notes/), "OWL, ALPS, L-ADMM"): SmolLM2-135M, CPU
# protocol, 0.7 unstructured, one resumable sweep folder beside the uniform Wanda and
# SparseGPT rows they are compared with (same run, same environment). Re-run to resume.
#   bash scripts/bench_baselines.sh [sweep folder]
set -u
DIR=${1:-sweeps/baselines}
SB=(sparsebench -m logger=disabled "hydra.sweep.dir=$DIR")
"${SB[@]}" method=wanda,sparsegpt sparsity=0.7 schedule=uniform,owl
"${SB[@]}" method=ladmm,alps sparsity=0.7
sparsebench-report "$DIR"
