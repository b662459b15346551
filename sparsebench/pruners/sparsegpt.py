"""SparseGPT (Frantar & Alistarh 2023): OBS-style pruning with a Cholesky-factored inverse Hessian.

Follows the official implementation: H = 2 X X^T / n as a running average (summed
as the official code sums it, so H is the same to the last bit), dead inputs get
H_jj = 1 and a zero column, damping percdamp * mean(diag H), Hinv is the upper
Cholesky factor of H^-1, columns in blocks of `blocksize`, the mask chosen per block
by W^2 / diag(Hinv)^2 (N:M: per M-group as the sweep reaches it, on the
already-updated weights), then column-wise error compensation.

How many weights a block prunes (`count`):
- "official" (default): every score <= the k-th smallest (0-based), k = int(block
  numel * s), as the official code does: k+1 per 128-column block, plus any weights
  whose score ties that value. Quantized checkpoints repeat weight values, so ties do
  occur (a few per block in SmolLM2's Q4 weights). Sparsity is a hair above the target
  (0.500012 for SmolLM2-135M at 0.5); the verifier checks k+1 per block plus a bounded
  tie surplus.
- "exact": exactly k per block, so every tensor meets the target exactly.
The two are the same algorithm, but one weight per block is enough to change later
columns' updates, the next blocks' inputs and ~1% of the final mask; on SmolLM2-135M
at 0.5 that moved WikiText-2 perplexity by 1.4% (docs/results.md (history: docs/notes/)). The
official
rule is the default so that numbers match the papers' code.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..engine.gram import inverse_factor
from ..engine.grid import grid_params, quantize
from ..errors import SparsebenchError
from ..registry import METHODS, option
from ..sparsity import project
from .layerwise import GramPruner

log = logging.getLogger(__name__)


@METHODS.register("sparsegpt")
@dataclass
class SparseGPT(GramPruner):
    statistic = "hessian"  # plus the prune-time copies of the largest one (plan.py)
    scored = True  # the OBS saliency of the dense weight (a refinement's start)
    blocksize: int = option(128, ge=1)
    percdamp: float = option(0.01, gt=0, lt=1e3)
    damp_retries: int = option(6, ge=0)  # each retry multiplies the damping by 10
    count: str = option(
        "official", choices=("official", "exact")
    )  # "official": score <= the k-th smallest, as the official code; "exact": k

    COUNTS: ClassVar[tuple[str, ...]] = ("official", "exact")
    # quant=gptq quant.joint=true: the stage's grid, rounded inside this sweep (set by specs)
    joint_quant: ClassVar[Any] = None

    def __post_init__(self):
        if self.count not in self.COUNTS:
            raise SparsebenchError(
                f"sparsegpt count must be one of {list(self.COUNTS)}, got '{self.count}'"
            )
        if self.blocksize < 1:
            raise SparsebenchError(f"sparsegpt blocksize must be >= 1, got {self.blocksize}")
        if not (0 < self.percdamp < 1e3):
            raise SparsebenchError(f"sparsegpt percdamp must be > 0, got {self.percdamp}")

    @property
    def group(self) -> str:  # type: ignore[override]
        return f"block:{self.blocksize}" + ("+1" if self.count == "official" else "")

    def prepare(self, stats):
        """(upper Cholesky factor of the damped H^-1, dead-input mask), once per distinct input."""
        H = stats.value
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        return inverse_factor(H, self.percdamp, self.damp_retries, "sparsegpt"), dead

    def score(self, linear, prepared):
        """The OBS saliency of the dense weight, W^2 / [H^-1]_jj^2 (dead inputs' columns at
        0), before any update: what the released DSnoT code starts from for SparseGPT."""
        Hinv, dead = prepared
        W = linear.weight.detach().float().clone()
        W[:, dead] = 0
        return W**2 / torch.diag(Hinv).reshape((1, -1)) ** 2

    def prune_linear(self, linear, prepared, sparsity, pattern):
        return self.prune_group([linear], prepared, sparsity, pattern)[0]

    def prune_group(self, linears, prepared, sparsity, pattern):
        """One OBS sweep for all linears that share this Hessian (q/k/v, gate/up).

        Rows are independent in the sweep (each row's update uses only its own error and the
        shared Hinv), so stacking the weights row-wise computes the same numbers as one sweep
        per linear, with the per-column loop run 4 times per Llama block instead of 7: that
        loop is launch-bound on a GPU. Unstructured masks are still chosen per linear (the
        official per-block threshold is over one weight matrix), N:M ones per row anyway;
        the per-column updates are elementwise (outer products), and the block-end product
        is done per linear.
        """
        Hinv, dead = prepared
        W = torch.cat([lin.weight.data.float() for lin in linears])  # a fresh float copy
        grid = self.joint_quant
        if grid is not None:  # the released --wbits: one grid per row, from the dense weight
            scale, zero = grid_params(W, grid.bits, grid.sym)
        W[:, dead] = 0
        ends = list(itertools.accumulate(lin.out_features for lin in linears))
        spans = list(zip([0] + ends[:-1], ends))  # each linear's rows in the stack
        cols = W.shape[1]
        keep = torch.ones_like(W, dtype=torch.bool)
        for i1 in range(0, cols, self.blocksize):
            i2 = min(i1 + self.blocksize, cols)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diag(Hinv1)
            keep1 = torch.ones_like(W1, dtype=torch.bool)
            if not pattern.is_nm:
                score = W1.pow(2) / d.pow(2).unsqueeze(0)
                for r1, r2 in spans:
                    keep1[r1:r2] = project(score[r1:r2], sparsity, pattern, self.group)
            for i in range(i2 - i1):
                if pattern.is_nm and i % pattern.m == 0:
                    score = W1[:, i : i + pattern.m].pow(2) / d[i : i + pattern.m].pow(2).unsqueeze(
                        0
                    )
                    keep1[:, i : i + pattern.m] = project(score, sparsity, pattern)
                w = W1[:, i]
                q = w * keep1[:, i]
                if grid is not None:
                    q = quantize(q.unsqueeze(1), scale, zero, grid.bits).flatten()
                Q1[:, i] = q
                err = (w - q) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i1:i2] = Q1
            keep[:, i1:i2] = keep1
            for r1, r2 in spans:
                # one product per linear, shaped as in a sweep of that linear alone: a GPU
                # matmul's summation order depends on the row count, and 1-ulp differences
                # flip near-tied scores downstream (one stacked product moved SmolLM2-135M's
                # WikiText-2 perplexity by 1.5% at 0.5 on an H100)
                W[r1:r2, i2:] -= Err1[r1:r2] @ Hinv[i1:i2, i2:]
        for lin, (r1, r2) in zip(linears, spans):
            lin.weight.data.copy_(W[r1:r2].to(lin.weight.dtype))
            if grid is not None:  # what an export stores beside the codes
                grid.grids[lin] = (scale[r1:r2].cpu(), zero[r1:r2].cpu())
        return [keep[r1:r2].clone() for r1, r2 in spans]  # own storage: saved masks stay small
