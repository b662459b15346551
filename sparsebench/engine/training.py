"""The one training step every method that trains shares: Elsa and Elsa-L (whole model,
next-token loss), SAFE and SAFE+ (block by block, reconstruction loss, SAM), and the
recovery stages (masked fine-tuning, PERP, block-wise reconstruction).

One step, in this order (the released Elsa and SAFE codes' order):
  gradients       the sum over micro-batch closures of loss.backward(); with rho > 0 a
                  SAM step: the gradient at w + rho g/||g|| (one norm over every trained
                  parameter), w restored afterwards
  finite check    a NaN/inf loss is one clear error naming the step
  clipping        clip_grad_norm_ over every trained parameter (None: no clipping)
  before_update   hooks: the ADMM penalty lam (w - z + u), added after clipping
  optimizer step  then the lr schedule advances
  after_update    hooks: ADMM z/u updates, or re-masking (pruned weights exactly zero)

Callers own their data (fresh windows, shuffled block inputs) and pass one closure per
micro-batch; the trainer counts steps, tokens and wall time for the run's budget.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import torch

from ..errors import SparsebenchError


def sync_cuda() -> None:
    """Wait for queued CUDA work (it runs asynchronously) before reading a clock; a no-op
    where CUDA was never used."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def use_bf16(flag: bool | None, device: torch.device) -> bool:
    """The bf16 rule of every method that trains: bf16 autocast on CUDA (the released codes),
    float32 on the CPU; an explicit true / false wins."""
    return device.type == "cuda" if flag is None else bool(flag)


def float_master(model: torch.nn.Module, who: str) -> torch.dtype:
    """Adam on float16 weights underflows (eps 1e-8, tiny updates): train float32 master weights
    (bf16 autocast stays available); returns the dtype to cast back to at the end."""
    import logging

    dtype = next(model.parameters()).dtype
    if dtype == torch.float16:
        logging.getLogger(__name__).warning(
            "%s: float16 model trained in float32 (set model.dtype=bfloat16 or "
            "float32 to avoid the copy)",
            who,
        )
        model.float()
    return dtype


def embedding_weights(model: torch.nn.Module) -> set[int]:
    """ids of the input embedding and lm_head weights (one when tied): what freeze_embeddings
    keeps."""
    ids = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        ids.add(id(model.get_output_embeddings().weight))
    return ids


def mean_over_ranks(device: torch.device) -> Callable[[float], float]:
    """A Trainer's reduce_loss under torch.distributed: the mean of the ranks' losses."""
    import torch.distributed as dist

    def reduce(loss: float) -> float:
        t = torch.tensor([loss], device=device)
        dist.all_reduce(t)
        return float(t) / dist.get_world_size()

    return reduce


class Hook(Protocol):
    def before_update(self, step: int) -> None: ...
    def after_update(self, step: int) -> None: ...


def linear_decay(total: int) -> Callable[[int], float]:
    """lr multiplier 1 -> 0 over `total` steps, no warm-up (Elsa; masked fine-tuning)."""
    return lambda step: max(0.0, 1.0 - step / total)


def warmup_linear(warmup: int, total: int) -> Callable[[int], float]:
    """transformers' get_linear_schedule_with_warmup (the released SAFE code): 0 -> 1 over
    `warmup` steps (step 0 has lr 0), then linearly to 0 at `total`."""

    def at(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return at


@dataclass
class Budget:
    """What a stage spent: tokens read for calibration and for training, optimizer steps."""

    calib_tokens: int = 0
    train_tokens: int = 0
    optimizer_steps: int = 0
    # seconds inside optimizer steps (forward, backward, update): train_tokens / train_s is tokens/s
    train_s: float = 0.0

    def add(self, other: "Budget") -> "Budget":
        return Budget(
            self.calib_tokens + other.calib_tokens,
            self.train_tokens + other.train_tokens,
            self.optimizer_steps + other.optimizer_steps,
            self.train_s + other.train_s,
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "calib_tokens": self.calib_tokens,
            "train_tokens": self.train_tokens,
            "optimizer_steps": self.optimizer_steps,
            "train_s": round(self.train_s, 3),
        }


class MaskHook:
    """Re-mask after every optimizer step: pruned weights stay exactly zero."""

    def __init__(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]):
        from .shard import local, row_sharded, rows_of

        # bool on the weight's device: 1 byte per weight (the product with a bool is the same
        # as with 0/1 in the weight's dtype); an FSDP2 shard keeps its rows of the mask
        self.pairs = [
            (
                local(p),
                rows_of(m.to(torch.bool), p) if row_sharded(p) else m.to(p.device, torch.bool),
            )
            for p, m in pairs
        ]

    def before_update(self, step: int) -> None:
        pass

    @torch.no_grad()
    def after_update(self, step: int) -> None:
        for p, m in self.pairs:
            p.mul_(m)


class ADMMHook:
    """The ADMM engine (engine/admm.py) as a trainer hook."""

    def __init__(self, admm):
        self.admm = admm
        self.lam = 0.0
        self.updated = False

    def before_update(self, step: int) -> None:
        self.lam = self.admm.add_penalty(step)  # after clipping, after DDP's all-reduce

    def after_update(self, step: int) -> None:
        self.updated = self.admm.after_step(step)


@dataclass
class Trainer:
    params: list[torch.Tensor]  # every trained parameter (clipping and SAM's norm run over them)
    optimizer: torch.optim.Optimizer
    lr_at: Callable[[int], float]  # lr multiplier of each param group's base lr
    clip: float | None = None
    rho: float = 0.0  # SAM radius; 0: a plain step
    hooks: list = field(default_factory=list)
    name: str = "train"
    reduce_loss: Callable[[float], float] = lambda loss: loss  # e.g. the mean over DDP ranks
    steps_done: int = field(default=0, init=False)
    tokens: int = field(default=0, init=False)
    wall_s: float = field(default=0.0, init=False)
    grad_norm: float = field(default=0.0, init=False)

    def __post_init__(self):
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]

    def _backward(self, closures: list[Callable[[], torch.Tensor]]) -> float:
        total = 0.0
        for closure in closures:
            loss = closure()
            loss.backward()
            total += float(loss.detach())
        return total

    def _sam(self, closures) -> float:
        """grad f(w + e), e = rho g / ||g||; returns the loss at w (what the bar shows)."""
        loss = self._backward(closures)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = float(torch.sqrt(sum(g.float().pow(2).sum() for g in grads))) if grads else 0.0
        scale = self.rho / (norm + 1e-12)
        eps = []
        with torch.no_grad():
            for p in self.params:
                e = p.grad * scale if p.grad is not None else None
                if e is not None:
                    p.add_(e)
                eps.append(e)
        for p in self.params:
            p.grad = None
        try:
            self._backward(closures)
        finally:
            with torch.no_grad():
                for p, e in zip(self.params, eps):
                    if e is not None:
                        p.sub_(e)
        return loss

    def step(self, closures: list[Callable[[], torch.Tensor]], tokens: int) -> float:
        """One optimizer step over the micro-batch closures; returns the (reduced) loss."""
        sync_cuda()
        start = time.perf_counter()
        step = self.steps_done
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.lr_at(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._sam(closures) if self.rho > 0 else self._backward(closures)
        loss = self.reduce_loss(loss)
        if not math.isfinite(loss):
            raise SparsebenchError(
                f"{self.name}: loss is {loss} at step {step}; lower the learning rate "
                f"(or lambda), or check the model's dtype"
            )
        if self.clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            self.grad_norm = float(
                norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            )  # a DTensor under FSDP2
        for hook in self.hooks:
            hook.before_update(step)
        self.optimizer.step()
        for hook in self.hooks:
            hook.after_update(step)
        self.steps_done += 1
        self.tokens += tokens
        sync_cuda()  # CUDA runs asynchronously: a step ends when its kernels have
        self.wall_s += time.perf_counter() - start
        return loss

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def budget(self) -> Budget:
        return Budget(
            train_tokens=self.tokens, optimizer_steps=self.steps_done, train_s=self.wall_s
        )
