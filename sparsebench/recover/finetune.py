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
from dataclasses import dataclass

import torch

from ..engine.shard import place_for_training, unshard
from ..engine.training import (
    MaskHook,
    Trainer,
    embedding_weights,
    float_master,
    linear_decay,
    mean_over_ranks,
    use_bf16,
)
from ..engine.windows import WindowTraining, ranks
from ..models import prunable_linears
from ..plan import Terms
from . import RECOVERIES, RecoverContext, Recovery

log = logging.getLogger(__name__)


@dataclass
class WindowRecovery(WindowTraining, Recovery):
    """A recovery that trains on fresh windows (masked fine-tuning, PERP): the shared loop
    (engine/windows.py) with plain Adam, the linear decay and `trainable` as the only trained
    parameters."""

    def train_recovery(
        self, ctx: RecoverContext, trainable: list[torch.nn.Parameter], hooks: list
    ) -> Trainer:
        seqlen = self.seqlen or ctx.seqlen
        _, world = ranks()
        opt = torch.optim.Adam(
            trainable, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=0.0
        )
        trainer = Trainer(
            trainable,
            opt,
            linear_decay(self.steps),
            clip=self.clip,
            hooks=hooks,
            name=f"recover={self.name}",
            reduce_loss=mean_over_ranks(ctx.device) if world > 1 else (lambda x: x),
        )
        sampler = self.windows(ctx.data, ctx.tokenizer, seqlen, ctx.model.config.vocab_size)
        self.train_on_windows(
            ctx.model,
            trainer,
            sampler,
            ctx.device,
            seqlen,
            label=f"recover {self.name}",
            log=ctx.log,
            log_prefix="recover",
        )
        self._budget = trainer.budget()
        return trainer

    def plan_terms(self, device):
        return Terms(
            "train",
            batch=self.batch_size,
            grad_accum=self.grad_accum,
            seqlen=self.seqlen,
            bf16=use_bf16(self.bf16, device),
            **self.trained_terms(),
        )

    def trained_terms(self) -> dict:
        return {}


@RECOVERIES.register("finetune")
@dataclass
class Finetune(WindowRecovery):
    freeze_embeddings: bool = False  # keep the embeddings and lm_head fixed

    shardable = True

    def trained_terms(self) -> dict:
        return {"trained": "no_embeddings" if self.freeze_embeddings else "all"}

    def run(self, ctx: RecoverContext) -> None:
        model = ctx.model
        dtype = float_master(model, f"recover={self.name}")
        sharded = ctx.engine == "fsdp"  # FSDP2 over the ranks, or offload=true in a group of one
        place_for_training(model, ctx.device, sharded, ctx.offload, use_bf16(self.bf16, ctx.device))
        linears = prunable_linears(model)
        frozen = embedding_weights(model) if self.freeze_embeddings else set()
        trainable = [p for p in model.parameters() if id(p) not in frozen]
        for p in model.parameters():
            p.requires_grad_(id(p) not in frozen)
        hook = MaskHook((linears[n].weight, m) for n, m in ctx.masks.items())
        try:
            self.train_recovery(ctx, trainable, [hook])
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
        self._report = {
            "trainable_params": sum(p.numel() for p in trainable),
            "total_params": total,
            "steps_run": self.budget().optimizer_steps,
            "history": self.history,
        }
