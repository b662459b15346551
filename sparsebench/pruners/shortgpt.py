"""ShortGPT (Men et al., 2024): Block Influence BI_i = 1 - E[cos(x_i, x_{i+1})], the mean over
every calibration token of the cosine between block i's input and output hidden states;
the n blocks of lowest influence are removed (n from the run's share, cut/). No official
code is released; this is the paper's definition."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cut import block_io, cosine
from ..registry import METHODS
from .base import PruneContext
from .removal import BlockRemoval


def block_influence(ctx: PruneContext) -> list[float]:
    """BI of every decoder block over the calibration windows (float64 sums)."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def visit(i, x, y):
        c = cosine(x, y)
        sums[i] = sums.get(i, 0) + c.sum()
        counts[i] = counts.get(i, 0) + c.numel()

    block_io(ctx.model, ctx.calib, ctx.device, visit, ctx.inputs, ctx.calib_batch)
    return [1 - float(sums[i] / counts[i]) for i in sorted(sums)]


@METHODS.register("shortgpt")
@dataclass
class ShortGPT(BlockRemoval):
    def choose(self, ctx, n):
        bi = block_influence(ctx)
        order = sorted(range(len(bi)), key=lambda i: (bi[i], i))  # ties: the earlier block
        return order[:n], {"block_influence": [round(v, 6) for v in bi]}
