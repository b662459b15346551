"""Per-block sparsity allocation: the schedule group's `allocation` (uniform | owl).

OWL (Yin et al., ICML 2024, luuyin/OWL `prune_wanda_outlier`):
1. One dense pass over the calibration windows, block by block (the sequential driver with
   Wanda's statistics, nothing pruned: every block's inputs are the dense model's). For block i,
   the Wanda
   scores |W_jk| * ||X_k|| of all its linears, flattened together; its outlier ratio is
   the percentage of scores above m times their mean.
2. The ratios are min-max scaled to [0, 2 lam], centred, and added to the target keep
   ratio 1 - s: block i prunes s_i = 1 - keep_i (mean s_i = s; more outliers, fewer pruned).
   Equal ratios (nothing to tell the blocks apart) give the uniform allocation.
3. Balance (sparsebench; `schedule.owl.balance`): a method prunes int(cols * s_i) per row
   (or int(numel * s_i) per tensor), so each block rounds down, up to a row's worth per
   linear. Block by block, s_i is nudged to the smallest value whose pruned count brings
   the running total to the exact target count so far; the total is then exact to within
   the last block's rounding step. Off by default: balance=false keeps the released code's
   s_i, which the parity check reproduces mask for mask.
The targets go to every method through PruneContext.block_targets and to the mask
verifier; results.json records ratios, raw and balanced targets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .engine.driver import Sequential, collect_statistics
from .errors import SparsebenchError
from .models import find_blocks, find_linears
from .pruners.wanda import Wanda
from .sparsity import OWL, Pattern, Schedule, expected_pruned

log = logging.getLogger(__name__)


@torch.no_grad()
def outlier_ratios(model, calib: torch.Tensor, device: torch.device, m: float) -> list[float]:
    """Each block's outlier ratio (percent) on the dense model: the sequential driver with
    Wanda's statistics and nothing pruned, so every block sees the dense model's inputs."""
    wanda = Wanda()
    ratios = []
    for step in Sequential(model, calib, device, desc="owl outlier ratios"):
        linears, groups, stats, _, _ = collect_statistics(
            step.block,
            step.inputs,
            step.args,
            step.kwargs,
            wanda.new_stats,
            wanda.add_batch,
            who="owl",
        )
        # |W_jk| * ||X_k|| of every linear, flattened together in block order (the mean's summation
        # order)
        scores = torch.cat(
            [
                (linears[n].weight.abs().float() * stats[leader].value.sqrt().unsqueeze(0))
                .flatten()
                .cpu()
                for leader, names in groups.items()
                for n in names
            ]
        )
        ratios.append(float((scores > torch.mean(scores) * m).sum().item()) / scores.numel() * 100)
    return ratios


def owl_targets(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities from outlier ratios, as the released code computes them (float64)."""
    r = np.asarray(ratios, dtype=np.float64)
    if r.max() == r.min():  # nothing tells the blocks apart (the released code divides by zero)
        return [sparsity] * len(r)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    keep = r - np.mean(r) + (1 - sparsity)
    targets = [float(1 - k) for k in keep]
    bad = [t for t in targets if not 0.0 <= t < 1.0]
    if bad:
        raise SparsebenchError(
            f"schedule=owl with sparsity={sparsity} and schedule.owl.lam={lam} gives block "
            "sparsities from "
            f"{min(targets):.4f} to {max(targets):.4f}, outside [0, 1); lower schedule.owl.lam"
        )
    return targets


def _pruned(shapes: list[tuple[int, int]], s: float, pattern: Pattern, group: str) -> int:
    return sum(expected_pruned(shape, s, pattern, group) for shape in shapes)


def balance(
    targets: list[float],
    shapes: list[list[tuple[int, int]]],
    sparsity: float,
    pattern: Pattern,
    group: str,
) -> list[float]:
    """Nudge each block's target so the running pruned count tracks the exact total (see above)."""
    out: list[float] = []
    want = done = 0.0
    for s, block in zip(targets, shapes):
        numel = sum(r * c for r, c in block)
        want += s * numel
        need = round(want - done)  # weights this block should prune
        if _pruned(block, s, pattern, group) == need:
            t = s
        else:  # smallest t whose count reaches `need` (counts are non-decreasing in t)
            lo, hi = max(0.0, s - 0.05), min(s + 0.05, 0.999999)
            if (
                _pruned(block, lo, pattern, group) > need
                or _pruned(block, hi, pattern, group) < need
            ):
                lo, hi = 0.0, 0.999999
            for _ in range(60):
                mid = (lo + hi) / 2
                if _pruned(block, mid, pattern, group) >= need:
                    hi = mid
                else:
                    lo = mid
            t = hi
        out.append(t)
        done += _pruned(block, t, pattern, group)
    return out


@dataclass
class Allocation:
    targets: list[float]  # per block, what the methods prune to
    report: dict[str, Any] = field(default_factory=dict)
    # a searched allocation (EvoPress): each linear's target, and the level database whose
    # weights are the pruned model (evopress.py); None for a per-block rule (OWL)
    linear_targets: dict[str, float] | None = None
    database: Any = None


def allocate(
    schedule: Schedule,
    model,
    calib: torch.Tensor | None,
    sparsity: float,
    pattern: Pattern,
    group: str,
    device: torch.device,
    pruner=None,
    seed: int = 0,
    workdir=None,
    log_fn=lambda metrics: None,
) -> Allocation | None:
    """Per-block targets for a non-uniform schedule; None for the uniform one. EvoPress
    (evopress.py) also gives each linear's target and the database the pruned model comes from."""
    if schedule.allocation == "uniform":
        return None
    if schedule.allocation == "evopress":
        from .evopress import allocate_evopress
        from .sparsity import EvoPressSearch

        linear, blocks, report, db = allocate_evopress(
            schedule.evopress or EvoPressSearch(), model, calib, sparsity, pattern, pruner,
            device, seed, workdir, log_fn,
        )  # fmt: skip
        return Allocation(blocks, report, linear_targets=linear, database=db)
    owl: OWL = schedule.owl or OWL()
    if calib is None:
        raise SparsebenchError("schedule=owl needs calibration windows (data.nsamples > 0)")
    ratios = outlier_ratios(model, calib, device, owl.m)
    raw = owl_targets(ratios, sparsity, owl.lam)
    _, blocks = find_blocks(model)
    shapes = [[tuple(lin.weight.shape) for lin in find_linears(b).values()] for b in blocks]
    targets = balance(raw, shapes, sparsity, pattern, group) if owl.balance else raw
    total = sum(r * c for block in shapes for r, c in block)
    realized = sum(_pruned(block, t, pattern, group) for block, t in zip(shapes, targets)) / total
    log.info(
        "owl: block sparsities %.4f..%.4f (target %g, realized %.6f)",
        min(targets),
        max(targets),
        sparsity,
        realized,
    )
    return Allocation(
        targets,
        {
            "kind": "owl",
            "m": owl.m,
            "lam": owl.lam,
            "balance": owl.balance,
            "outlier_ratio": ratios,
            "targets_raw": raw,
            "targets": targets,
            "expected_sparsity": realized,
        },
    )
