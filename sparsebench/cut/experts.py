"""Fewer experts: whole experts of a mixture of experts removed, with their router rows.

A mixture-of-experts layer here is a module holding `experts` (families.LinearExperts: one
gate/up/down nn.Linear per expert, children "0".."E-1") and a router (`gate` or `router`,
whose `weight` has a row per expert). `moe_layers` finds them in a block; `keep_experts`
keeps the given experts in place, renumbered 0..k-1 in their order, and slices the router's
rows (and bias, and a score-correction bias where one exists) so the router's softmax and
top-k run over the kept experts only; top-k itself is unchanged. `set_expert_count` makes the
config say the new count once every layer has it, so the export is a plain transformers model
of the family with fewer experts."""

from __future__ import annotations

import torch
from torch import nn

from ..families import LinearExperts

ROUTERS = ("gate", "router")
COUNT_KEYS = ("num_local_experts", "num_experts", "moe_num_experts")


def moe_layers(block: nn.Module) -> list[tuple[nn.Module, LinearExperts, nn.Module]]:
    """[(the MoE module, its experts, its router)] of a decoder block (empty: a dense MLP)."""
    out = []
    for module in block.modules():
        experts = getattr(module, "experts", None)
        router = next((getattr(module, r) for r in ROUTERS if hasattr(module, r)), None)
        if isinstance(experts, LinearExperts) and getattr(router, "weight", None) is not None:
            out.append((module, experts, router))
    return out


def keep_experts(experts: LinearExperts, router: nn.Module, kept: list[int]) -> None:
    """Keep experts `kept` (ascending) in place, their router rows with them."""
    modules = [experts.get_submodule(str(e)) for e in kept]
    for name in list(experts._modules):
        if name.isdigit():
            del experts._modules[name]
    for i, module in enumerate(modules):
        experts.add_module(str(i), module)
    experts.num_experts = len(kept)
    index = torch.tensor(kept, dtype=torch.long, device=router.weight.device)
    router.weight = nn.Parameter(router.weight.detach()[index].contiguous())
    for name in ("bias", "e_score_correction_bias"):
        value = getattr(router, name, None)
        if isinstance(value, torch.Tensor):
            sliced = value.detach()[index].contiguous()
            if isinstance(value, nn.Parameter):
                sliced = nn.Parameter(sliced)
            setattr(router, name, sliced)
    for name in ("num_experts", "n_experts", "n_routed_experts"):
        if isinstance(getattr(router, name, None), int):
            setattr(router, name, len(kept))


def set_expert_count(config, count: int) -> None:
    for key in COUNT_KEYS:
        if hasattr(config, key):
            setattr(config, key, count)
