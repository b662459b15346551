"""FLAP (An et al., AAAI 2024; CASIA-IVA-Lab/FLAP `prune_flap`): retraining-free width pruning.

1. Statistics on the dense model, block by block: for the input X of each block's output
   projections (o_proj: attention channels; down_proj: MLP channels), the released running
   mean and "fluctuation" (`lib/layerwrapper.py` BiasGPT: one sample per window; the first
   window adds no fluctuation, and the released update multiplies by the new mean twice,
   because its old-mean tensor is the same object: reproduced).
2. Metric per input channel: WIFV = fluctuation x sum over rows of W^2 (default), IFV, or
   WIFN = mean over rows of |W| sqrt(mean ||X_j||^2); the attention metric is squared.
3. Structure: AL-AM (default, adaptive across layers and modules): each block's metrics
   standardised, attention channels averaged per key/value group, one threshold over all of
   them weighted by the weights a unit holds (a group's weights over a channel's, truncated to
   an integer as the released int tensor does: 512/3 -> 170 for Llama), the share removed
   closest to `sparsity`; UL-UM: int(sparsity x units) removed in every block.
4. Compression: the kept groups' q/k/v rows and o columns, the kept channels' gate/up rows
   and down columns (cut/widths.py), and the bias that adds the removed channels' mean input
   back (the mean stored in float16, as released).

Departures: grouped attention removes whole key/value groups (the released code is for
multi-head Llama, a group of one); a block whose every group (or channel) would go keeps its
best one (reported; the released code would leave an empty projection)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..cut.widths import parts_of, plain_config, shrink, widths_of
from ..engine.driver import Sequential
from ..models import find_blocks
from ..registry import METHODS, option
from .base import PruneContext
from .removal import BlockRemoval


class Fluctuation:
    """The released BiasGPT statistics of one linear's input, window by window."""

    def __init__(self, columns: int, device):
        self.n = 0
        self.mean = torch.zeros(columns, device=device)
        self.fluc = torch.zeros(columns, device=device)
        self.sq = torch.zeros(columns, device=device)  # WIFN's mean of squared norms

    def add(self, x: torch.Tensor) -> None:  # x: (tokens, columns), one window
        n = self.n
        self.mean *= n / (n + 1)
        self.mean += x.mean(0) / (n + 1)
        if n > 0:  # the released update: (x - new mean)^2, the first window adds nothing
            self.fluc *= (n - 1) / n
            self.fluc += ((x - self.mean) * (x - self.mean)).sum(0) / (n + 1)
        self.sq *= n / (n + 1)
        self.sq += x.float().norm(dim=0) ** 2 / (n + 1)
        self.n = n + 1


def metric_of(kind: str, stat: Fluctuation, weight: torch.Tensor) -> torch.Tensor:
    w = weight.float()
    if kind == "IFV":
        return stat.fluc
    if kind == "WIFV":
        return stat.fluc * w.pow(2).sum(0)
    return (w.abs() * stat.sq.sqrt()[None]).mean(0)  # WIFN


def standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)


def adaptive_keep(attn, mlp, unit_weight: int, share: float):
    """AL-AM: one threshold over every block's standardised group and channel metrics."""
    metric = torch.cat([attn.reshape(-1), mlp.reshape(-1)])
    ordered, index = torch.sort(metric, descending=True)
    weight = torch.ones_like(index)
    weight[index < attn.numel()] = unit_weight
    total = torch.cumsum(weight, 0)
    threshold = ordered[torch.argmin(torch.abs(total - weight.sum() * (1 - share)))]
    return attn > threshold, mlp > threshold


def uniform_keep(metric: torch.Tensor, share: float) -> torch.Tensor:
    """UL-UM: int(share x units) of one block's units removed (ties kept)."""
    threshold = torch.sort(metric)[0][int(share * metric.numel())]
    return metric >= threshold


@METHODS.register("flap")
@dataclass
class FLAP(BlockRemoval):
    structured: ClassVar[str] = "widths"
    metric: str = option("WIFV", choices=["WIFV", "IFV", "WIFN"])
    structure: str = option("AL-AM", choices=["AL-AM", "UL-UM"])
    bias: bool = True  # the released bias compensation

    def prune(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        self.check_context(ctx)
        model = ctx.model
        _, blocks = find_blocks(model)
        parts = [parts_of(b, model.config) for b in blocks]
        before = sum(p.numel() for b in blocks for p in b.parameters())
        stats = self._statistics(ctx, blocks, parts)
        attn, mlp = [], []
        for p, (sa, sm) in zip(parts, stats):
            attn.append(metric_of(self.metric, sa, getattr(p.attention, p.o).weight) ** 2)
            mlp.append(metric_of(self.metric, sm, getattr(p.mlp, p.out).weight))
        g = parts[0].group * parts[0].head_dim  # channels of one key/value group
        if self.structure == "AL-AM":
            units, channel = parts[0].unit_params()
            a = standardize(torch.stack(attn)).reshape(len(blocks), -1, g).mean(2)
            keep_a, keep_m = adaptive_keep(
                a, standardize(torch.stack(mlp)), units // channel, ctx.sparsity
            )
        else:
            keep_a = torch.stack(
                [uniform_keep(x.reshape(-1, g).sum(1), ctx.sparsity) for x in attn]
            )
            keep_m = torch.stack([uniform_keep(x, ctx.sparsity) for x in mlp])
        forced = []
        for i, (p, (sa, sm)) in enumerate(zip(parts, stats)):
            for keep, score in ((keep_a, attn[i].reshape(-1, g).sum(1)), (keep_m, mlp[i])):
                if not keep[i].any():  # never an empty projection: the best unit stays
                    keep[i, score.argmax()] = True
                    forced.append(i)
            o, down = getattr(p.attention, p.o).weight, getattr(p.mlp, p.out).weight
            gone_a = ~keep_a[i].repeat_interleave(g)
            shrink(
                p,
                keep_a[i],
                keep_m[i],
                self._bias(sa, gone_a, o) if self.bias else None,
                self._bias(sm, ~keep_m[i], down) if self.bias else None,
            )
        widths = widths_of(model, blocks)
        plain = plain_config(model, blocks)  # one width for all: a plain transformers config
        after = sum(p.numel() for b in blocks for p in b.parameters())
        self._report = {
            "widths": widths,
            "plain_config": plain,
            "kv_heads_before": int(keep_a.shape[1]),
            "channels_before": int(keep_m.shape[1]),
            "block_params_before": before,
            "block_params_removed": before - after,
            "removed_share": round((before - after) / before, 6),
            "forced_keeps": forced,
            "metric": self.metric,
            "structure": self.structure,
        }
        return {}

    @staticmethod
    def _bias(stat: Fluctuation, gone: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The removed channels' mean input through their columns (mean in float16, as released)."""
        mean = stat.mean.half().to(weight.dtype).to(weight.device)
        return (mean * gone.to(weight.device)) @ weight.T

    def _statistics(self, ctx, blocks, parts):
        """[(o_proj's input statistics, down_proj's)] of every block, from the dense model: the
        hooks of block i are on while the driver runs block i for block i+1's inputs (not in
        its first capture pass, which runs the blocks once more for their arguments)."""
        stats, hooks = [], []

        def record(stat):
            def hook(module, args):
                x = args[0].detach()
                for window in x.reshape(x.shape[0] if x.dim() == 3 else 1, -1, x.shape[-1]):
                    stat.add(window)

            return hook

        driver = Sequential(
            ctx.model, ctx.calib, ctx.device, ctx.inputs, ctx.calib_batch, desc="flap statistics"
        )
        try:
            for step in driver:
                for h in hooks:  # block i-1 has run: its statistics are complete
                    h.remove()
                hooks, p = [], parts[step.index]
                pair = []
                for lin in (getattr(p.attention, p.o), getattr(p.mlp, p.out)):
                    pair.append(Fluctuation(lin.in_features, lin.weight.device))
                    hooks.append(lin.register_forward_pre_hook(record(pair[-1])))
                stats.append(tuple(pair))
        finally:
            for h in hooks:
                h.remove()
        return stats
