"""The angular-distance rule of Gromov et al. (2024, "The Unreasonable Ineffectiveness of the
Deeper Layers"): for the n blocks to remove, the start l minimising
d(x_l, x_{l+n}) = arccos(cos(x_l, x_{l+n})) / pi, the angle between the hidden state entering
block l and the one leaving block l+n-1, at the final token of each calibration window
(`tokens=last`, the paper's; `all`: every token), averaged over windows; blocks l..l+n-1 are
removed (then healed, in the paper with QLoRA: recover= here). No official code is released."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..cut import block_io, cosine
from ..models import find_blocks
from ..registry import METHODS, option
from .removal import BlockRemoval


def angular_distances(states: list[torch.Tensor], n: int) -> list[float]:
    """states[l]: the hidden states entering block l (states[L]: leaving the last), tokens x
    hidden; -> d(l, n) for every start l = 0 .. L - n, the mean over tokens of arccos / pi."""
    out = []
    for start in range(len(states) - n):
        c = cosine(states[start], states[start + n]).clamp(-1, 1)
        out.append(float(torch.arccos(c).mean() / math.pi))
    return out


@METHODS.register("angular")
@dataclass
class Angular(BlockRemoval):
    tokens: str = option("last", choices=["last", "all"])  # which tokens' states are compared

    def choose(self, ctx, n):
        L = len(find_blocks(ctx.model)[1])
        states: list[list[torch.Tensor]] = [[] for _ in range(L + 1)]

        def pick(h):  # batch x seqlen x hidden -> tokens x hidden (float64 on the host)
            h = h[:, -1] if self.tokens == "last" else h.reshape(-1, h.shape[-1])
            return h.double().cpu()

        def visit(i, x, y):
            states[i].append(pick(x))
            if i == L - 1:  # the state leaving the last block
                states[L].append(pick(y))

        block_io(ctx.model, ctx.calib, ctx.device, visit, ctx.inputs, ctx.calib_batch)
        d = angular_distances([torch.cat(s) for s in states], n)
        start = min(range(len(d)), key=lambda i: (d[i], i))
        return list(range(start, start + n)), {
            "angular_distance": [round(v, 6) for v in d],
            "start": start,
        }
