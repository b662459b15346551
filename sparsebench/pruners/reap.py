"""Expert removal for mixtures of experts, block by block on the calibration windows.

REAP (Lasby et al. 2025, arXiv 2510.13999; CerebrasResearch/reap; llm-compressor's
`REAPPruningModifier`): the saliency of expert j is the mean, over the tokens routed to it,
of its router weight (the one its output is multiplied by) x the L2 norm of its output; the
lowest experts of each MoE layer are removed with their router rows (cut/experts.py).
`method=expert_frequency`, the simple baseline: how many tokens the router sends to each.

As llm-compressor's sequential pipeline, block i is scored on the inputs that the blocks
before it give after their own experts were removed, then cut before its outputs feed block
i+1. The count: `sparsity` is the share of the blocks' weights removed, so every MoE layer
loses the same number of experts, floor(sparsity x blocks' weights / (MoE layers x an
expert's weights and router row) + 0.5): how many that is, and the share it gives, are
printed and recorded. A share that removes no expert, or leaves fewer than the router's
top-k, and a model without experts are refused before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..cut.experts import keep_experts, moe_layers, set_expert_count
from ..engine.driver import Sequential, Windows
from ..errors import SparsebenchError
from ..models import find_blocks
from ..registry import METHODS
from .base import PruneContext
from .removal import BlockRemoval


def experts_to_drop(model, share: float) -> tuple[int, int, int]:
    """(experts each MoE layer loses, experts per layer, the weights that removes), refused now
    where the share removes none or leaves fewer than top-k (works on a meta model)."""
    blocks = find_blocks(model)[1]
    layers = [m for b in blocks for m in moe_layers(b)]
    if not layers:
        raise SparsebenchError(
            f"{type(model).__name__} has no mixture-of-experts layer: expert removal needs "
            "experts (models: tiny-mixtral, tiny-qwen3-moe, tiny-olmoe, mixtral-8x7b, ...)"
        )
    _, experts, router = layers[0]
    total = sum(p.numel() for b in blocks for p in b.parameters())
    one = sum(p.numel() for p in experts.get_submodule("0").parameters()) + router.weight.shape[1]
    n = math.floor(share * total / (len(layers) * one) + 0.5)
    count, top_k = experts.num_experts, int(getattr(router, "top_k", 1))
    if n < 1 or count - n < top_k:
        raise SparsebenchError(
            f"sparsity={share} removes {n} of the {count} experts of each MoE layer (an expert "
            f"is {one * len(layers) / total:.4f} of the blocks' weights); at least 1, and "
            f"{top_k} (the router's top-k) must stay"
        )
    return n, count, n * len(layers) * one


class Saliency:
    """One MoE layer's per-expert sum and count over the routed tokens (float64)."""

    def __init__(self, count: int, frequency: bool):
        self.sum = torch.zeros(count, dtype=torch.float64)
        self.n = torch.zeros(count, dtype=torch.float64)
        self.frequency = frequency
        self.route = None

    def hooks(self, experts):
        def routed(module, args):  # (hidden, top_k_index, top_k_weights): the router's choice
            self.route = (args[1].detach(), args[2].detach())

        def output(e):
            def hook(module, args, out):
                index, weights = self.route
                pos, token = torch.where(index.T == e)  # LinearExperts' order: slot-major
                w = weights[token, pos].double().cpu()
                norms = torch.linalg.norm(out.detach().float(), dim=-1).double().cpu()
                self.sum[e] += w.numel() if self.frequency else (w * norms).sum()
                self.n[e] += w.numel()

            return hook

        handles = [experts.register_forward_pre_hook(routed)]
        for e in range(experts.num_experts):
            down = experts.get_submodule(str(e)).down_proj
            handles.append(down.register_forward_hook(output(e)))
        return handles

    def scores(self) -> torch.Tensor:
        return self.sum if self.frequency else self.sum / self.n.clamp(min=1.0)


@METHODS.register("reap")
@dataclass
class REAP(BlockRemoval):
    structured: ClassVar[str] = "experts"
    frequency: ClassVar[bool] = False

    def prune(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        self.check_context(ctx)
        n, count, _ = experts_to_drop(ctx.model, ctx.sparsity)
        blocks = find_blocks(ctx.model)[1]
        before = sum(p.numel() for b in blocks for p in b.parameters())
        kept_by_layer, scores = {}, {}
        driver = Sequential(
            ctx.model, ctx.calib, ctx.device, ctx.inputs, ctx.calib_batch, desc=f"{self.name}"
        )
        for step in driver:
            layers = moe_layers(step.block)
            stats = [Saliency(experts.num_experts, self.frequency) for _, experts, _ in layers]
            handles = [h for s, (_, ex, _) in zip(stats, layers) for h in s.hooks(ex)]
            try:
                with torch.no_grad():  # window by window (inputs may be pinned on the host)
                    for window in Windows(step.inputs, ctx.device, 1):
                        step.block(window, *step.args, **step.kwargs)
            finally:
                for h in handles:
                    h.remove()
            for k, (stat, (_, experts, router)) in enumerate(zip(stats, layers)):
                s = stat.scores()
                drop = set(torch.topk(s, n, largest=False).indices.tolist())
                kept = [e for e in range(experts.num_experts) if e not in drop]
                keep_experts(experts, router, kept)  # before the driver runs it for block i+1
                key = f"{step.index}" + (f".{k}" if len(layers) > 1 else "")
                kept_by_layer[key], scores[key] = kept, [round(float(v), 6) for v in s]
        set_expert_count(ctx.model.config, count - n)
        after = sum(p.numel() for b in blocks for p in b.parameters())
        self._report = {
            "kept_experts": kept_by_layer,
            "experts_before": count,
            "experts_after": count - n,
            "block_params_before": before,
            "block_params_removed": before - after,
            "removed_share": round((before - after) / before, 6),
            "scores": {"frequency" if self.frequency else "saliency": scores},
        }
        return {}


@METHODS.register("expert_frequency")
@dataclass
class ExpertFrequency(REAP):
    """The baseline: the experts the router sends the fewest calibration tokens are removed."""

    frequency: ClassVar[bool] = True
