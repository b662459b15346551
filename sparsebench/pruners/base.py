"""The one interface every method implements."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

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
    # For methods that train on a stream of fresh windows (Elsa): the tokenizer, the
    # data spec (calibration source) and the window length.
    tokenizer: Any = None
    data: Any = None
    seqlen: int = 0
    log: Callable[[dict[str, Any]], None] = lambda metrics: None  # e.g. wandb
    # Per-block targets from a non-uniform allocation (schedule=owl; sparsebench/allocation.py),
    # indexed as the model's decoder blocks; None: every linear gets `sparsity`.
    block_targets: list[float] | None = None
    # How a training method runs under torch.distributed: ddp | fsdp (run.resolve_engine;
    # auto: ddp). One process is always single. Under fsdp the model is sharded in place; the
    # method then loads `fresh_model()` on rank 0, fills it with the trained weights and sets
    # ctx.model to it (the pipeline reads it back).
    engine: str = "auto"
    # one-shot methods: the calibration inputs of a block on the compute "device" or pinned on
    # the "host" (engine/driver.py; calib_inputs=, the memory plan decides under auto)
    inputs: str = "device"
    calib_batch: int = 1  # one-shot methods: windows per forward through a block (engine/driver.py)
    offload: bool = (
        False  # fsdp: the shards, gradients and optimizer state in host memory (engine/shard.py)
    )
    fresh_model: Callable[[], Any] | None = None
    # The run folder and fingerprint: training checkpoints go to <workdir>/checkpoint and are
    # resumed only by a run with the same fingerprint (sparsebench/engine/checkpoint.py).
    workdir: Any = None
    fingerprint: str | None = None
    checkpoint_every: int = 0  # steps between training checkpoints; 0: none
    refine: Any = None  # a Refinement (refine/) run in the block walk of one-shot methods

    def block_sparsity(self, i: int) -> float:
        return self.sparsity if self.block_targets is None else self.block_targets[i]

    def for_block(self, i: int) -> "PruneContext":
        """This context with block i's target as the one sparsity (for per-block drivers)."""
        return dataclasses.replace(self, sparsity=self.block_sparsity(i), block_targets=None)

    def targets(self, names) -> dict[str, float]:
        """{full linear name: its target} for linears of the model's decoder blocks."""
        if self.block_targets is None:
            return {n: self.sparsity for n in names}
        return targets_by_linear(self.model, self.block_targets, names)


def targets_by_linear(model: nn.Module, block_targets: list[float], names) -> dict[str, float]:
    """{full linear name: its block's target}; names are `<blocks path>.<i>.<linear>`."""
    from ..models import find_blocks

    path, _ = find_blocks(model)
    return {n: block_targets[int(n[len(path) + 1 :].split(".", 1)[0])] for n in names}


# what a structured method removes, in words (Pruner.structured)
STRUCTURES = {
    "blocks": "whole decoder blocks",
    "widths": "attention groups and MLP channels",
    "experts": "whole experts of each mixture-of-experts layer",
}


class Pruner:
    """prune(ctx) edits the model in place and returns {linear name: keep mask (bool, CPU)}."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    # True if prune() can run under torchrun (one process per GPU, torch.distributed).
    distributed: ClassVar[bool] = False
    # Comparison group of unstructured masks (see sparsity.py); the verifier checks against it.
    group: ClassVar[str] = "tensor"
    # True if the method draws its own windows from the calibration pool (Elsa's stream):
    # the pool's file is then part of the run's fingerprint even without `needs_calibration`.
    reads_data: ClassVar[bool] = False
    # True if the method runs over steps, so that a ramp (schedule.ramp) changes what it does.
    iterative: ClassVar[bool] = False

    # True when the method may permute input columns before forming N:M groups
    permutes_columns: ClassVar[bool] = False
    # A structured method removes whole parts of the model ("blocks") and returns no masks:
    # the run's sparsity is the share of the blocks' weights removed (cut/); None: masks
    structured: ClassVar[str | None] = None

    @property
    def makes_masks(self) -> bool:
        """True when prune() returns a mask per pruned linear (not dense, not structured)."""
        return self.name != "dense" and self.structured is None

    @property
    def column_orders(self) -> dict[str, torch.Tensor]:
        """{linear: the input-column order its N:M groups were chosen in}, for the linears
        whose columns the method permuted (RIA's channel reallocation); empty otherwise."""
        return getattr(self, "_column_orders", {})

    @property
    def masks_group(self) -> str:
        """The comparison group the run's masks are verified against (`group`, unless a stage
        changes how the masks are counted)."""
        return self.group

    @property
    def reads_calibration(self) -> bool:
        return self.needs_calibration or self.reads_data

    def prune(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def refinable(self) -> "Pruner | None":
        """The pruner that makes this method's masks inside the one-shot block walk, where a
        refinement (refine/) runs: the one-shot methods themselves, magnitude's block-walk
        twin; None for a method with no block-by-block masks (dense, the training methods)."""
        return None

    def mask_target(self, sparsity: float, pattern: Pattern | None = None) -> float:
        """What a linear's mask prunes for the linear's target `sparsity` (the same, except for
        a method that keeps a part beside the sparse weight: OATS's low-rank factors)."""
        return sparsity

    def plan_terms(self, device: torch.device):
        """What the method holds, for the memory plan: a plan.Terms (None: undeclared, and the
        plan refuses the run rather than plan it without its terms)."""
        return None

    def budget(self):
        """Tokens and optimizer steps the method spent beyond the run's calibration windows
        (training methods; see sparsebench/engine/training.py)."""
        from ..engine.training import Budget

        return Budget()

    def report(self) -> dict[str, Any]:
        """Method-specific measurements for results.json (curves, state sizes, ...). A
        `warnings` list holds one-line findings of the method about its own result (an
        alternation that raised its error, say): the end-of-run summary prints them and the
        report lists the run under them, so a figure the method doubts is never printed bare."""
        return {}
