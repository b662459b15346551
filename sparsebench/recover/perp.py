"""PERP (Zimmer, Andoni, Spiegel, Pokutta 2023): retrain a small, expressive subset of
the pruned model instead of all of it.

  variant=norms     the normalization parameters and biases only (0.01-0.05% of a
                    model's parameters); the pruned linears are not trained
  variant=masklora  peft's LoRA adapters on every pruned linear, their update B A
                    multiplied by the linear's mask so the merged weight keeps it
                    (MaskLoRA), plus norms and biases, as the released code's default

peft has no masked LoRA, so the mask is put around peft's layers: each adapter layer's
`get_delta_weight` (which peft's merge also calls) is multiplied by the mask, and the
layer's forward uses base weight + that masked delta. After training peft merges and
unloads the adapters: the model is a plain pruned model again.

Released defaults (ZIB-IOL/PERP main.py): rank 16, alpha 32, dropout 0, lr 5e-4 decayed
linearly, AdamW without weight decay ((0.9, 0.999), eps 1e-8), gradient clipping 1.0
(transformers' Trainer default). The released default also trains lm_head; here it does
not (lm_head is as large as the embeddings and PERP's point is the small set). Steps,
batch and seqlen follow recover=finetune (the Elsa budget) so rows compare at equal tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.training import float_master
from ..errors import SparsebenchError
from ..registry import option
from . import RECOVERIES, RecoverContext, norm_and_bias_parameters
from .finetune import WindowRecovery


def _mask_lora_layer(layer, mask: torch.Tensor) -> None:
    """Make a peft LoRA Linear apply (B A) * mask, in its forward and in peft's merge."""
    delta = layer.get_delta_weight

    def masked_delta(adapter):
        d = delta(adapter)
        return d * mask.to(d.device, d.dtype)

    def forward(x, *args, **kwargs):
        base = layer.base_layer
        weight = base.weight
        for adapter in layer.active_adapters:
            weight = weight + masked_delta(adapter).to(weight.dtype)
        return F.linear(x, weight, base.bias)

    layer.get_delta_weight = masked_delta
    layer.forward = forward


@RECOVERIES.register("perp")
@dataclass
class Perp(WindowRecovery):
    variant: str = option("masklora", choices=("masklora", "norms"))
    rank: int = option(16, ge=1)
    alpha: float = option(32.0, gt=0)
    train_norms: bool = True  # masklora: also train norms and biases (released default)
    lr: float = option(5e-4, gt=0, lt=1)
    betas: tuple[float, float] = option((0.9, 0.999), ge=0, lt=1)

    def trained_terms(self) -> dict:
        # a few parameters train (adapters, norms); adapters keep each linear's merged weight
        return {"trained": "none", "merged_copy": self.variant == "masklora"}

    def run(self, ctx: RecoverContext) -> None:
        model = ctx.model
        dtype = float_master(model, f"recover={self.name}")
        model.to(ctx.device)
        total = sum(p.numel() for p in model.parameters())
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            if self.variant == "norms":
                trainable = norm_and_bias_parameters(model)
                for p in trainable:
                    p.requires_grad_(True)
                self.train_recovery(ctx, trainable, hooks=[])
                adapters = 0
            else:
                trainable, adapters = self._masklora(ctx)
        finally:
            for p in model.parameters():
                p.requires_grad_(True)
        model.to(dtype)
        self._report = {
            "variant": self.variant,
            "trainable_params": sum(p.numel() for p in trainable),
            "adapter_params": adapters,
            "total_params": total,
            "steps_run": self.budget().optimizer_steps,
            "history": self.history,
        }

    def _masklora(self, ctx: RecoverContext):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise SparsebenchError(
                "recover=perp variant=masklora needs peft: pip install peft (make install has it)"
            ) from None
        model = ctx.model
        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=0.0,
            bias="none",
            target_modules=sorted(ctx.masks),
        )
        peft_model = get_peft_model(model, config)
        for name, mask in ctx.masks.items():
            _mask_lora_layer(peft_model.base_model.model.get_submodule(name), mask)
        adapters = [p for n, p in peft_model.named_parameters() if "lora_" in n]
        extra = norm_and_bias_parameters(model) if self.train_norms else []
        for p in extra:
            p.requires_grad_(True)
        trainable = adapters + extra
        self.train_recovery(ctx, trainable, hooks=[])
        with torch.no_grad():
            peft_model.merge_and_unload()  # masked deltas merged; the model is plain again
        return trainable, sum(p.numel() for p in adapters)
