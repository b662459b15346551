"""Masked fine-tuning: the whole model on its own next-token loss, pruned weights held at
exactly zero (the full gradient is clipped as Elsa clips it, the step is taken, and the
weights are re-masked).

Same window stream, optimizer, lr schedule and clipping as Elsa (pruners/elsa.py): with
the same steps, batch, seqlen and seed it reads exactly Elsa's tokens, so it is the
control that makes an ADMM method's gain attributable (its warm start + this).
Defaults are Elsa's published budget: 4096 steps x 8 windows, Adam (0.9, 0.95), lr 2e-4
linear to 0 without warm-up, clipping 1.0; norms and embeddings train too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..errors import SparsebenchError
from ..models import prunable_linears
from ..registry import option
from ..engine.shard import place_for_training, unshard
from ..engine.training import MaskHook, Trainer, linear_decay, mean_over_ranks
from . import RECOVERIES, RecoverContext, Recovery

log = logging.getLogger(__name__)


@dataclass
class WindowTraining:
    """The options every recovery that trains on fresh windows shares (named as Elsa's)."""

    steps: int = option(4096, ge=1)
    batch_size: int = option(8, ge=1)  # windows per optimizer step
    grad_accum: int = option(1, ge=1)  # micro-batches per step
    seqlen: int | None = option(None, ge=2)  # None: model.seqlen
    lr: float = option(2e-4, gt=0, lt=1)  # decayed linearly to 0, no warm-up
    betas: tuple[float, float] = option((0.9, 0.95), ge=0, lt=1)
    eps: float = option(1e-8, gt=0)
    clip: float = option(1.0, gt=0)
    bf16: bool | None = None  # None: bf16 autocast on CUDA, float32 on the CPU
    seed: int = 0
    log_every: int = option(8, ge=1)
    history: list[dict[str, float]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.batch_size % self.grad_accum:
            raise SparsebenchError(f"recover: batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")

    def train_on_windows(self, ctx: RecoverContext, trainable: list[torch.nn.Parameter], hooks: list) -> Trainer:
        """Steps of next-token loss on fresh windows from the calibration pool (the stream
        Elsa reads for the same seed), with `trainable` as the only trained parameters."""
        from ..data import window_source

        model, device = ctx.model, ctx.device
        seqlen = self.seqlen or ctx.seqlen
        micro = self.batch_size // self.grad_accum
        # under FSDP2 on several ranks (recover/finetune on torchrun) every rank draws the same
        # global batch and trains on its slice, as Elsa does: the data does not depend on the ranks
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        if micro % world:
            raise SparsebenchError(f"recover: micro-batch {micro} is not divisible by {world} ranks")
        share = micro // world
        opt = torch.optim.Adam(trainable, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=0.0)
        trainer = Trainer(trainable, opt, linear_decay(self.steps), clip=self.clip, hooks=hooks,
                          name=f"recover={self.name}", reduce_loss=mean_over_ranks(device) if world > 1 else (lambda x: x))
        sampler = window_source(ctx.data, ctx.tokenizer, seqlen, self.seed, model.config.vocab_size)
        bf16 = device.type == "cuda" if self.bf16 is None else self.bf16
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

        def closure(x):
            def loss():
                with autocast:
                    return model(input_ids=x, labels=x, use_cache=False).loss / self.grad_accum
            return loss

        model.train()
        bar = tqdm(range(self.steps), desc=f"recover {self.name}", unit="step", disable=rank != 0)
        for step in bar:
            batches = [sampler.batch(micro)[rank * share:(rank + 1) * share].to(device) for _ in range(self.grad_accum)]
            loss = trainer.step([closure(x) for x in batches], tokens=self.batch_size * seqlen)
            if step % self.log_every == 0 or step == self.steps - 1:
                rec = {"step": step, "loss": loss, "lr": trainer.lr, "grad_norm": trainer.grad_norm}
                self.history.append(rec)
                bar.set_postfix(loss=f"{loss:.3f}")
                ctx.log({f"recover/{k}": v for k, v in rec.items()})
        model.eval()
        opt.zero_grad(set_to_none=True)  # free the gradients before evaluation (and FSDP2's final gather)
        self._budget = trainer.budget()
        return trainer


def float_master(model: torch.nn.Module) -> torch.dtype:
    """Adam on float16 weights underflows: train float32 master weights, cast back after."""
    dtype = next(model.parameters()).dtype
    if dtype == torch.float16:
        log.warning("recover: float16 model trained in float32 (use model.dtype=bfloat16 or float32 to avoid the copy)")
        model.float()
    return dtype


@RECOVERIES.register("finetune")
@dataclass
class Finetune(WindowTraining, Recovery):
    freeze_embeddings: bool = False  # keep the embeddings and lm_head fixed

    shardable = True

    def run(self, ctx: RecoverContext) -> None:
        model = ctx.model
        dtype = float_master(model)
        sharded = ctx.engine == "fsdp"  # FSDP2 over the ranks, or offload=true in a group of one
        bf16 = ctx.device.type == "cuda" if self.bf16 is None else self.bf16
        place_for_training(model, ctx.device, sharded, ctx.offload, bf16)
        linears = prunable_linears(model)
        frozen = set()
        if self.freeze_embeddings:
            frozen = {id(model.get_input_embeddings().weight)}
            if model.get_output_embeddings() is not None:
                frozen.add(id(model.get_output_embeddings().weight))
        trainable = [p for p in model.parameters() if id(p) not in frozen]
        for p in model.parameters():
            p.requires_grad_(id(p) not in frozen)
        hook = MaskHook((linears[n].weight, m) for n, m in ctx.masks.items())
        try:
            self.train_on_windows(ctx, trainable, [hook])
        finally:
            for p in model.parameters():
                p.requires_grad_(True)
        if sharded:  # back to a plain model on rank 0 (a collective)
            plain = unshard(model, ctx.load_dense)
            if plain is None:
                return  # the other ranks are done: rank 0 verifies, evaluates and records
            model = ctx.model = plain
        model.to(dtype)
        total = sum(p.numel() for p in model.parameters())
        self._report = {"trainable_params": sum(p.numel() for p in trainable), "total_params": total,
                        "steps_run": self.budget().optimizer_steps, "history": self.history}
