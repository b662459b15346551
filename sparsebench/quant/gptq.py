"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, ICLR 2023), the released IST-DASLab/gptq
`fasterquant` at its defaults, with a mask kept.

Block by block (the one-shot walk, engine/driver.py): one pass of the block over its
calibration inputs accumulates H = 2 X^T X / n per distinct input (as SparseGPT, the same
bits); each linear then gets, from its own weight W:
  dead inputs   H_jj = 1 and W's column zeroed (after the per-row grid is taken)
  act_order     columns in order of decreasing H_jj (`act_order=true`), undone at the end
  Hinv          the upper Cholesky factor of the damped H^-1 (percdamp 0.01 of mean diag)
  sweep         128 columns at a time: each column rounded on its row's grid (a new grid
                at every `group_size` columns, from the weights as they then are, or fixed
                up front with `static_groups`), its error (w - q) / Hinv_jj compensated
                into the columns after it, the block's error into the rest at its end
A mask changes one thing: a pruned weight's value is 0 before it is rounded (0 is on every
grid, so it stays 0), and its error - the value compensation had moved it to - goes into the
kept weights after it, as SparseGPT's joint sweep does. The grid of a group is taken from
its kept weights (pruned ones count as the 0 they will be). Without a mask (a dense model)
this is the released sweep, bit for bit (scripts/parity_gptq.py).

An expert no calibration token reached has no Hessian: it is rounded to nearest (counted in
the report), as the one-shot methods prune such an expert by magnitude.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..engine.driver import Sequential, collect_statistics
from ..engine.gram import RunningMean, inverse_factor, scaled_gram
from ..engine.grid import grid_params, quantize
from ..registry import option
from . import QUANTIZERS, QuantContext, Quantization
from .rtn import rtn_grids


def gptq_sweep(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    sym: bool,
    group_size: int = -1,
    keep: torch.Tensor | None = None,
    act_order: bool = False,
    static_groups: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
    damp_retries: int = 0,
    grids: list | None = None,
) -> tuple[torch.Tensor, float]:
    """(the rounded W (float32, dequantized), the sweep's loss sum (w - q)^2 / Hinv_jj^2 / 2)
    for one linear's weight W (rows, cols) and its input Hessian H (cols, cols; modified in
    place). `keep`: the mask to keep (pruned weights end at exactly 0). `grids`, a list, gets
    each group's (scale, zero) in column order (empty under act_order with dynamic groups:
    those grids follow the permuted order)."""
    W = W.float().clone()
    cols = W.shape[1]
    if keep is not None:
        W = W * keep  # a pruned weight is 0 before any grid is taken
    scale, zero = grid_params(W, bits, sym)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = []
    if static_groups and group_size != -1:
        for c in range(0, cols, group_size):
            static.append(grid_params(W[:, c : c + group_size], bits, sym))
    dynamic = []  # the grids of dynamic groups as the sweep takes them (column order)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        keep = keep[:, perm] if keep is not None else None
    Hinv = inverse_factor(H, percdamp, damp_retries, "gptq", "quant.percdamp")
    Q = torch.zeros_like(W)
    loss = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if group_size != -1:
                if not static_groups:
                    if c % group_size == 0:
                        span = W[:, c : c + group_size]
                        if keep is not None:
                            span = span * keep[:, c : c + group_size]
                        scale, zero = grid_params(span, bits, sym)
                        if not act_order:
                            dynamic.append((scale, zero))
                else:
                    scale, zero = static[int(perm[c] if perm is not None else c) // group_size]
            w = W1[:, i]
            d = Hinv1[i, i]
            q = w if keep is None else w * keep[:, c]
            q = quantize(q.unsqueeze(1), scale, zero, bits).flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        loss += float(Losses1.sum()) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    if grids is not None:
        if group_size == -1:
            grids.append((scale, zero))
        elif static_groups:
            grids.extend(static)
        elif not act_order:
            grids.extend(dynamic)
    return Q, loss


@QUANTIZERS.register("gptq")
@dataclass
class GPTQ(Quantization):
    needs_calibration: ClassVar[bool] = True
    act_order: bool = False  # columns by decreasing H_jj (the released --act-order)
    static_groups: bool = False  # every group's grid from the weight before the sweep
    blocksize: int = option(128, ge=1)
    percdamp: float = option(0.01, gt=0)
    damp_retries: int = option(0, ge=0)  # the released code stops at a failed Cholesky: 0

    stats: ClassVar[str] = (
        "hessian"  # the plan holds a Hessian per distinct input of a block, as SparseGPT's
    )

    @torch.no_grad()
    def run(self, ctx: QuantContext) -> None:
        if self.joint:  # rounded inside SparseGPT's sweep already (pruners/sparsegpt.py)
            self._report = {"linears": 0, "rounded_in_pruning": True}
            return
        start = time.perf_counter()
        driver = Sequential(
            ctx.model, ctx.calib, ctx.device, ctx.inputs, ctx.calib_batch, desc="gptq blocks"
        )
        done, nearest, loss = 0, [], 0.0
        self.grids = {}
        for step in driver:
            prefix = f"{driver.path}.{step.index}."
            linears, groups, stats, _tokens, unused = collect_statistics(
                step.block,
                step.inputs,
                step.args,
                step.kwargs,
                lambda c, d: RunningMean(torch.zeros(c, c, device=d)),
                lambda st, x: st.add_term(x, scaled_gram),
                ctx.calib_batch,
                who="quant=gptq",
            )
            for leader, names in groups.items():
                H = stats.pop(leader).value
                for name in names:  # each linear its own copy of H, as the released code
                    loss += self._round(linears[name], H.clone(), ctx.masks, prefix + name)
                    done += 1
            for name in unused:
                w = linears[name].weight
                Q, scale, zero = rtn_grids(w.data, *self.grid)
                w.data.copy_(Q.to(w.dtype))
                self.grids[linears[name]] = (scale.cpu(), zero.cpu())
                nearest.append(prefix + name)
        self._report = {
            "linears": done + len(nearest),
            "rounded_to_nearest": nearest,
            "sweep_loss": loss,
            "seconds": round(time.perf_counter() - start, 3),
        }

    def _round(self, linear, H, masks, full_name) -> float:
        keep = None if masks is None else masks[full_name].to(linear.weight.device)
        grids: list = []
        Q, loss = gptq_sweep(
            linear.weight.data,
            H,
            self.bits,
            self.sym,
            self.group_size,
            keep,
            self.act_order,
            self.static_groups,
            self.blocksize,
            self.percdamp,
            self.damp_retries,
            grids,
        )
        linear.weight.data.copy_(Q.to(linear.weight.dtype))
        if grids:
            scale = torch.cat([g[0] for g in grids], 1)
            self.grids[linear] = (scale.cpu(), torch.cat([g[1] for g in grids], 1).cpu())
        return loss

    def report(self) -> dict[str, Any]:
        return {**super().report(), "act_order": self.act_order}
