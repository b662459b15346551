"""Wanda++ (Yang et al., ACL Findings 2025, "Pruning Large Language Models via Regional
Gradients"). No authors' code is released (the paper says so); the algorithm and defaults are
the paper's, the defaults as an unofficial reproduction also sets them.

Block by block, in the one-shot walk (pruners/layerwise.py), on the block's calibration
inputs X_n (the outputs of the blocks already pruned):
  targets   the dense block's outputs f(X_n)
  RGS       regional gradients: G = sqrt(mean_n (d ||f(X_n)||_2 / dW)^2) per linear weight,
            one backward through this block alone per window; the score is
            (alpha G_ij + ||X_j||_2) |W_ij| (alpha = 100) with ||X_j||_2 over all the
            windows' tokens, pruned per output row as Wanda (N:M per group); alpha = 0 is
            Wanda's score, bit for bit
  RO        regional optimization: `ro_iters` rounds, each over `ro_samples` windows drawn
            at random, one RMSprop step per window (lr 3e-7) on the summed squared error
            between the pruned block's output and the dense block's, the masks frozen (the
            pruned weights are re-zeroed after every step)
The optimized block then produces the next block's inputs.

The paper alternates RGS pruning and RO for a few rounds; with the masks frozen during RO, a
later round's RGS cannot change a mask (a pruned weight is an exact zero, the lowest score),
so the masks are chosen once and the rounds are RO's. The walk runs in float32 (RMSprop's
3e-7 steps vanish in a 16-bit weight); on a float32 model the masks at alpha = 0 equal
Wanda's. The blocks return to the model's dtype afterwards.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..engine.driver import block_out
from ..engine.training import Budget, MaskHook, Trainer
from ..models import find_linears
from ..plan import Terms
from ..registry import METHODS, option
from ..sparsity import project
from .wanda import Wanda


def regional_gradients(
    block: nn.Module, linears: dict[str, nn.Linear], inps: torch.Tensor, args, kwargs
) -> dict[str, torch.Tensor]:
    """{linear name: sqrt(mean over windows of (d ||block(X_n)||_2 / dW)^2)} (float32), one
    window per backward. A linear no window reaches (an expert nothing was routed to) gets
    zeros. Only the linears' weights require a gradient meanwhile."""
    params = list(block.parameters())
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    weights = [lin.weight for lin in linears.values()]
    for w in weights:
        w.requires_grad_(True)
    sq = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    try:
        with torch.enable_grad():
            for j in range(inps.shape[0]):
                out = block_out(block(inps[j : j + 1], *args, **kwargs))
                grads = torch.autograd.grad(out.float().norm(), weights, allow_unused=True)
                for acc, g in zip(sq, grads):
                    if g is not None:
                        acc.add_(g.float().pow(2))
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)
    return {name: (acc / inps.shape[0]).sqrt_() for name, acc in zip(linears, sq)}


@torch.no_grad()
def reconstruction_error(block: nn.Module, inps, targets, args, kwargs) -> float:
    """Mean squared error of the block's outputs against `targets`, over every window."""
    total = 0.0
    for j in range(inps.shape[0]):
        out = block_out(block(inps[j : j + 1], *args, **kwargs))
        total += float((out.float() - targets[j : j + 1].float()).pow(2).sum())
    return total / targets.numel()


def regional_trainer(block: nn.Module, linears, masks, lr: float, name: str) -> Trainer:
    """RMSprop (torch defaults, constant lr) on the linears' weights, re-masked after every
    step; the block's other parameters frozen (restore them with `release`)."""
    for p in block.parameters():
        p.requires_grad_(False)
    weights = [lin.weight for lin in linears.values()]
    for w in weights:
        w.requires_grad_(True)
    hook = MaskHook((linears[n].weight, masks[n]) for n in linears)
    opt = torch.optim.RMSprop(weights, lr=lr)
    return Trainer(weights, opt, lambda step: 1.0, hooks=[hook], name=name)


def regional_step(trainer: Trainer, block: nn.Module, x, y, args, kwargs) -> float:
    """One RO step on windows x towards the dense outputs y; returns the loss before it."""

    def loss():
        return (block_out(block(x, *args, **kwargs)).float() - y.float()).pow(2).sum()

    with torch.enable_grad():
        return trainer.step([loss], tokens=x.shape[0] * x.shape[1])


def release(block: nn.Module) -> None:
    for p in block.parameters():
        p.requires_grad_(True)


@METHODS.register("wanda_pp")
@dataclass
class WandaPP(Wanda):
    alpha: float = option(100.0, ge=0)  # weight of the regional gradient in the score
    ro_iters: int = option(5, ge=0)  # rounds of regional optimization; 0: RGS alone
    ro_samples: int = option(32, ge=1)  # windows per round (all of them if fewer)
    ro_lr: float = option(3e-7, gt=0, lt=1)  # RMSprop's learning rate
    seed: int = 0  # the draw of each round's windows

    walk_dtype: ClassVar[torch.dtype] = torch.float32

    def plan_terms(self, device):
        # a block in training beside Wanda's norms: its float32 weights, their gradients,
        # RMSprop's square averages and the regional-gradient scores (each at most the
        # block's size: the plan's 4 float32 copies of the block), one window's activations
        return Terms("blockwise", stats="norms", batch=1)

    def budget(self) -> Budget:
        return getattr(self, "_budget", Budget())

    def score(self, linear, stats):
        grad = self._grads.get(linear)
        norms = stats.value.sqrt().unsqueeze(0)
        if grad is None:  # not reached by the gradient pass: Wanda's score
            return linear.weight.abs().float() * norms
        # The paper's ||X_j||_2 is over all N calibration windows' tokens; Wanda's statistic
        # keeps it divided by sqrt(N). Dividing the gradient term by sqrt(N) instead ranks
        # as (alpha G + ||X_j||_2) |W| does, and alpha = 0 stays Wanda's score bit for bit.
        scaled = self.alpha / math.sqrt(max(stats.nsamples, 1))
        return (scaled * grad + norms) * linear.weight.abs().float()

    def prune_linear(self, linear, stats, sparsity, pattern):
        return project(self.score(linear, stats), sparsity, pattern, self.group)

    def prune_block(
        self, block, inps, args, kwargs, sparsity, pattern, batch=1, scratch=None
    ) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        linears = find_linears(block)
        targets = scratch if scratch is not None else torch.empty_like(inps)
        with torch.no_grad():  # the dense block's outputs: RO's targets
            for j in range(inps.shape[0]):
                targets[j : j + 1] = block_out(block(inps[j : j + 1], *args, **kwargs))
        grads = regional_gradients(block, linears, inps, args, kwargs)
        self._grads = {linears[name]: g for name, g in grads.items()}
        grad_s = time.perf_counter() - start
        masks = super().prune_block(block, inps, args, kwargs, sparsity, pattern, batch)
        self._grads = {}
        rec: dict[str, Any] = {"block": len(self.blocks), "rgs_s": round(grad_s, 3)}
        if self.ro_iters > 0:
            rec.update(self._optimize(block, linears, masks, inps, targets, args, kwargs))
        self.blocks.append(rec)
        return masks

    def _optimize(self, block, linears, masks, inps, targets, args, kwargs) -> dict[str, Any]:
        start = time.perf_counter()
        before = reconstruction_error(block, inps, targets, args, kwargs)
        trainer = regional_trainer(
            block, linears, masks, self.ro_lr, f"wanda_pp block {len(self.blocks)}"
        )
        n = inps.shape[0]
        try:
            for _ in range(self.ro_iters):
                for j in torch.randperm(n, generator=self._gen)[: self.ro_samples].tolist():
                    regional_step(trainer, block, inps[j : j + 1], targets[j : j + 1], args, kwargs)
        finally:
            release(block)
        after = reconstruction_error(block, inps, targets, args, kwargs)
        self._budget = self.budget().add(trainer.budget())
        return {
            "ro_steps": trainer.steps_done,
            "recon_error_before_ro": before,
            "recon_error_after_ro": after,
            "ro_s": round(time.perf_counter() - start, 3),
        }

    def prune(self, ctx):
        self.blocks: list[dict[str, Any]] = []
        self._budget = Budget()
        self._gen = torch.Generator().manual_seed(self.seed)
        return super().prune(ctx)

    def report(self) -> dict[str, Any]:
        out = super().report()
        blocks = getattr(self, "blocks", [])
        if blocks:
            out["blocks"] = blocks
            out["rgs_s"] = round(sum(b["rgs_s"] for b in blocks), 3)
            if self.ro_iters > 0:
                out["ro_s"] = round(sum(b["ro_s"] for b in blocks), 3)
                out["steps_run"] = sum(b["ro_steps"] for b in blocks)
                out["recon_error_sum_before_ro"] = sum(b["recon_error_before_ro"] for b in blocks)
                out["recon_error_sum_after_ro"] = sum(b["recon_error_after_ro"] for b in blocks)
        return out
