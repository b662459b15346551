"""The one window-training loop: steps of next-token loss on fresh calibration windows, run by
Elsa and Elsa-L (pruners/elsa.py), masked fine-tuning and PERP (recover/).

What differs between them is not the loop but its hooks: ADMM's penalty and z/u updates, or
re-masking, ride on the trainer (engine/training.py: `ADMMHook`, `MaskHook`); extra history
fields, an extra reason to log and a checkpoint after a step are callbacks here.

Every rank draws the same global batch and trains on its slice, so the data seen does not
depend on the number of ranks; `grad_accum` micro-batches make one optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..errors import SparsebenchError
from ..registry import option
from .training import Trainer, use_bf16


def ranks() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class WindowTraining:
    """The options of every method that trains on fresh windows (Elsa's names and published
    defaults; a method overrides a default by declaring the field again)."""

    steps: int = option(4096, ge=1)
    batch_size: int = option(
        8, ge=1
    )  # windows per optimizer step (global, over all ranks and micro-batches)
    grad_accum: int = option(1, ge=1)  # micro-batches per step
    seqlen: int | None = option(None, ge=2)  # the training window; None: model.seqlen
    lr: float = option(2e-4, gt=0, lt=1)  # decayed linearly to 0, no warm-up
    betas: tuple[float, float] = option((0.9, 0.95), ge=0, lt=1)
    eps: float = option(1e-8, gt=0)
    clip: float = option(1.0, gt=0)
    bf16: bool | None = None  # bf16 autocast; None: on CUDA (the released codes), never on the CPU
    seed: int = 0
    log_every: int = option(8, ge=1)
    history: list[dict[str, float]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        # the ranges are checked once, by the registry (option(...)); what no single field says:
        self.betas = tuple(self.betas)
        if self.batch_size % self.grad_accum:
            raise SparsebenchError(
                f"{self.name}: batch_size={self.batch_size} is not divisible by "
                f"grad_accum={self.grad_accum}"
            )

    def micro_share(self) -> int:
        """Windows each rank trains on per micro-batch."""
        _, world = ranks()
        micro = self.batch_size // self.grad_accum
        if micro % world:
            raise SparsebenchError(
                f"{self.name}: micro-batch {micro} is not divisible by {world} ranks"
            )
        return micro // world

    def windows(self, data, tokenizer, seqlen: int, vocab_size: int):
        """The fresh-window stream (data.window_source) this run's seed draws."""
        from ..data import window_source

        return window_source(data, tokenizer, seqlen, self.seed, vocab_size)

    def train_on_windows(
        self,
        net: torch.nn.Module,
        trainer: Trainer,
        sampler,
        device: torch.device,
        seqlen: int,
        *,
        label: str,
        log: Callable[[dict[str, Any]], None],
        log_prefix: str,
        extras: Callable[[int], dict[str, float]] = lambda step: {},
        log_now: Callable[[], bool] = lambda: False,
        after_step: Callable[[int], None] = lambda step: None,
        first: int = 0,
    ) -> None:
        """Steps `first`..steps-1 of `trainer` on `sampler`'s windows through `net` (the model, or
        its DDP wrapper). Every `log_every` steps (and the last, and whenever `log_now()`) one
        history record {step, loss, extras(step), lr, grad_norm} is kept and logged."""
        rank, _ = ranks()
        share = self.micro_share()
        micro = self.batch_size // self.grad_accum
        autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=use_bf16(self.bf16, device)
        )

        def closure(x):
            def loss():
                with autocast:
                    return net(input_ids=x, labels=x, use_cache=False).loss / self.grad_accum

            return loss

        net.train()
        bar = tqdm(
            range(first, self.steps),
            desc=label,
            unit="step",
            disable=rank != 0,
            initial=first,
            total=self.steps,
        )
        for step in bar:
            # every rank draws the same global batch and trains on its slice
            batches = [
                sampler.batch(micro)[rank * share : (rank + 1) * share].to(device)
                for _ in range(self.grad_accum)
            ]
            loss = trainer.step([closure(x) for x in batches], tokens=self.batch_size * seqlen)
            if log_now() or step % self.log_every == 0 or step == self.steps - 1:
                more = extras(step)
                rec = {
                    "step": step,
                    "loss": loss,
                    **more,
                    "lr": trainer.lr,
                    "grad_norm": trainer.grad_norm,
                }
                self.history.append(rec)
                bar.set_postfix(
                    loss=f"{loss:.3f}", **{k: f"{v:.3g}" for k, v in more.items() if k == "dist"}
                )
                log({f"{log_prefix}/{k}": v for k, v in rec.items()})
            after_step(step)
        net.eval()
        trainer.optimizer.zero_grad(
            set_to_none=True
        )  # free the gradients (before evaluation, a final gather)
