"""The shared base of the structured methods (cut/): no masks, a smaller model. For block
removal (ShortGPT, angular distance) it scores the decoder blocks on the calibration windows,
removes as many as the run's share of the blocks' weights asks (the count, the removal and
the config in cut/) and reports which went; a subclass holds its rule only: `choose(ctx, n)`
-> the block indices to remove, and the scores it used. A width method (FLAP) overrides
`prune` and shares the checks, the plan terms and the report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..cut import blocks_for_share, remove_blocks
from ..errors import SparsebenchError
from ..models import find_blocks
from ..plan import Terms
from .base import STRUCTURES, PruneContext, Pruner


@dataclass
class BlockRemoval(Pruner):
    needs_calibration: ClassVar[bool] = True
    structured: ClassVar[str] = (
        "blocks"  # what the method removes (the run's sparsity is its share)
    )

    def plan_terms(self, device):
        # the one-shot walk's calibration inputs and outputs of a block; no projection, no
        # statistic beyond one number per block
        return Terms("oneshot", prunes=False)

    def choose(self, ctx: PruneContext, n: int) -> tuple[list[int], dict]:
        raise NotImplementedError

    def check_context(self, ctx: PruneContext) -> None:
        if ctx.pattern.is_nm or ctx.block_targets is not None:
            raise SparsebenchError(
                f"method={self.name} removes {STRUCTURES[self.structured]}: pattern and schedule "
                "allocation do not apply (use pattern=unstructured, schedule=uniform)"
            )

    def prune(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        self.check_context(ctx)
        _, blocks = find_blocks(ctx.model)
        sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
        n = blocks_for_share(ctx.sparsity, len(blocks))
        removed, scores = self.choose(ctx, n)
        removed = sorted(removed)
        remove_blocks(ctx.model, removed)
        self._report = {
            "removed_blocks": removed,
            "blocks_before": len(sizes),
            "blocks_after": len(sizes) - len(removed),
            "block_params_before": sum(sizes),
            "block_params_removed": sum(sizes[i] for i in removed),
            "removed_share": round(sum(sizes[i] for i in removed) / sum(sizes), 6),
            "scores": scores,
        }
        return {}  # no masks: the kept blocks are dense and whole

    def report(self):
        return getattr(self, "_report", {})
