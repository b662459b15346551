#!/usr/bin/env bash
# The equal-budget comparison of docs/results.md (history: docs/notes/) ("Controls at equal budgets"):
# SmolLM2-135M, CPU protocol, one resumable sweep folder. Every training row spends the
# token budget of the elsa_cpu preset (200 steps x 4 windows x 256 tokens = 204,800);
# recover=reconstruct runs at its released defaults (1 epoch over the 64 calibration
# windows per attention / MLP unit) and records its own tokens. Several CPU-hours on 2
# cores: re-run the same command to resume; finished jobs are skipped.
#   bash scripts/bench_equal_budget.sh [sweep folder]
set -u
DIR=${1:-sweeps/equal_budget}
SB=(sparsebench -m logger=disabled "hydra.sweep.dir=$DIR")
# 0.9: the headline (elsa_cpu) and its control first
"${SB[@]}" method=sparsegpt sparsity=0.9 recover=none,finetune_cpu
"${SB[@]}" method=elsa_cpu sparsity=0.9
"${SB[@]}" method=sparsegpt sparsity=0.9 recover=perp_cpu,reconstruct
"${SB[@]}" method=wanda sparsity=0.9 recover=none,finetune_cpu,perp_cpu,reconstruct
"${SB[@]}" method=safe_cpu,safe_plus_cpu sparsity=0.9
# safe_cpu's control: Wanda's mask reconstructed block by block with safe_cpu's windows,
# epochs, batch, lr and betas (no SAM, no ADMM); its budget is safe_cpu's block-local one
"${SB[@]}" method=wanda sparsity=0.9 recover=reconstruct recover.granularity=block recover.epochs=5 \
  recover.batch_size=4 recover.lr=5e-3 'recover.betas=[0.9,0.95]'
# safe_plus_cpu's control: the same with safe_plus_cpu's lr (3e-3)
"${SB[@]}" method=wanda sparsity=0.9 recover=reconstruct recover.granularity=block recover.epochs=5 \
  recover.batch_size=4 recover.lr=3e-3 'recover.betas=[0.9,0.95]'
# an ablation of safe_cpu: no SAM (plain ADMM), everything else equal
"${SB[@]}" method=safe_cpu sparsity=0.9 method.rho=0
# 0.7: SparseGPT, its fine-tuned control and the Elsa preset, three calibration/training seeds
"${SB[@]}" method=sparsegpt sparsity=0.7 recover=none,finetune_cpu seed=0,1,2
"${SB[@]}" method=elsa_cpu sparsity=0.7 seed=0,1,2
sparsebench-report "$DIR" --by-tokens
