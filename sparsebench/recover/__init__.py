"""Recovery after pruning: a stage between prune + verify and evaluation that trains the
pruned model again with its masks frozen (docs/recovery.md).

Every recovery is one file, registered by name (this package imports each of its modules,
so a new file is found without a list to edit), configured by `conf/recover/<name>.yaml`,
declares its memory-plan terms (`plan_terms`) and is composable with every method and pattern: it
takes the pruned model and its masks,
trains, and leaves the masks as they were (the pipeline verifies them again after it).

  none         no recovery (default)
  finetune     masked fine-tuning of the whole model on fresh windows: Elsa's stream,
               optimizer, lr schedule and clipping, so it is an ADMM method's control
  perp         parameter-efficient retraining (PERP): norms and biases, or MaskLoRA
  reconstruct  block-wise reconstruction of the kept weights against the dense blocks,
               attention and MLP separately (the "free lunch" paper's best granularity)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..engine.training import Budget
from ..registry import Registry

RECOVERIES = Registry("recovery")


@dataclass
class RecoverContext:
    model: nn.Module
    masks: dict[str, torch.Tensor]  # {linear name: keep mask}; frozen
    device: torch.device
    tokenizer: Any
    data: Any  # DataSpec: the calibration pool and the draw
    seqlen: int
    load_dense: Callable[[], nn.Module]  # the dense model again (reconstruction targets)
    log: Callable[[dict[str, Any]], None] = lambda metrics: None
    # engine=fsdp (recoveries with `shardable`): FSDP2 over the ranks, or with offload=true in a
    # process group of one; the recovery sets ctx.model to a plain model on rank 0 after it
    engine: str = "single"
    offload: bool = False


class Recovery:
    """run(ctx) trains ctx.model in place, keeping every pruned weight at exactly zero."""

    name: ClassVar[str]
    shardable: ClassVar[bool] = (
        False  # runs on FSDP2: several ranks under torchrun, or offload=true in one
    )
    needs_dense: ClassVar[bool] = False  # reads the dense model again (RecoverContext.load_dense)

    def run(self, ctx: RecoverContext) -> None:
        raise NotImplementedError

    def plan_terms(self, device: torch.device):
        """What the recovery holds, for the memory plan: a plan.Terms (None: undeclared, and
        the plan refuses the run rather than plan it without its terms)."""
        return None

    def budget(self) -> Budget:
        return getattr(self, "_budget", Budget())

    def report(self) -> dict[str, Any]:
        return getattr(self, "_report", {})


def norm_and_bias_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every normalization parameter (any module whose class name has "Norm") and every
    bias: PERP's parameter-efficient set."""
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            for p in module.parameters(recurse=False):
                params[id(p)] = p
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            params[id(p)] = p
    return list(params.values())


def _register_all() -> None:
    """Import every module of this package: a new recovery file registers itself."""
    import importlib
    import pkgutil

    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{module}")


_register_all()
