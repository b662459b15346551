"""The one interface every method implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..sparsity import Pattern, Schedule


@dataclass
class PruneContext:
    model: nn.Module
    sparsity: float
    pattern: Pattern
    schedule: Schedule
    device: torch.device
    calib: torch.Tensor | None = None  # (nsamples, seqlen) token ids, when the method needs it


class Pruner:
    """prune(ctx) edits the model in place and returns {linear name: keep mask (bool, CPU)}."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    # Comparison group of unstructured masks (see sparsity.py); the verifier checks against it.
    group: ClassVar[str] = "tensor"

    def prune(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError
