"""Masks are the source of truth: apply them, verify them, summarise them."""

from __future__ import annotations

import torch
from torch import nn

from .errors import SparsebenchError
from .sparsity import Pattern, count_rule, pruned_bounds


@torch.no_grad()
def apply_mask(linear: nn.Linear, keep: torch.Tensor) -> None:
    linear.weight.data.mul_(keep.to(linear.weight.device, linear.weight.dtype))


def verify(
    linears: dict[str, nn.Linear],
    masks: dict[str, torch.Tensor],
    sparsity: float | dict[str, float],
    pattern: Pattern,
    group: str,
    orders: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Check every mask: pruned count (exact; SparseGPT's official rule may add score ties),
    N:M validity, hard zeros in the weight. `sparsity` is one target, or each linear's
    (a non-uniform allocation, schedule=owl). `orders`: linears whose input columns a method
    permuted before choosing N:M groups (RIA's channel reallocation): their N:M groups are
    checked in that column order.

    Returns per-tensor sparsity (pruned / numel). Raises on any violation.
    """
    missing = sorted(set(linears) - set(masks))
    if missing:
        raise SparsebenchError(f"no mask for {len(missing)} prunable linears, e.g. {missing[0]}")
    report = {}
    for name, linear in linears.items():
        keep = masks[name].to(torch.bool)
        weight = linear.weight.detach()
        if keep.shape != weight.shape:
            raise SparsebenchError(
                f"mask of {name} has shape {tuple(keep.shape)}, weight {tuple(weight.shape)}"
            )
        pruned = int((~keep).sum())
        target = sparsity[name] if isinstance(sparsity, dict) else sparsity
        low, high = pruned_bounds(tuple(weight.shape), target, pattern, group)
        if not low <= pruned <= high:
            want = (
                f"{low}"
                if low == high
                else f"{low} plus at most {high - low} tied at the threshold"
            )
            hint = "; method.count=exact prunes exactly k per block" if low != high else ""
            raise SparsebenchError(
                f"{name}: mask prunes {pruned} of {keep.numel()} weights, target {want} "
                f"(sparsity {target}, {pattern}, group {group}){hint}"
            )
        if pattern.is_nm:
            order = (orders or {}).get(name)
            grouped = keep if order is None else keep[:, order.to(keep.device)]
            per_group = grouped.reshape(keep.shape[0], -1, pattern.m).sum(-1)
            if int(per_group.max()) > pattern.n:
                raise SparsebenchError(
                    f"{name}: an N:M group keeps more than {pattern.n} of {pattern.m}"
                )
        leaked = int((weight[~keep.to(weight.device)] != 0).sum())
        if leaked:
            raise SparsebenchError(f"{name}: {leaked} weights outside the mask are non-zero")
        report[name] = pruned / keep.numel()
    return report


def summarize(per_tensor: dict[str, float], linears: dict[str, nn.Linear]) -> dict[str, float]:
    """actual_sparsity = the pruned linears' zeros over their weights; for linears held as a
    sparse part plus low-rank factors (OATS) the share of their parameters removed, counting
    the factors as kept, with the split beside it (lowrank.compression)."""
    from .lowrank import SparsePlusLowRank, compression

    total = sum(lin.weight.numel() for lin in linears.values())
    pruned = sum(per_tensor[n] * linears[n].weight.numel() for n in linears)
    out = {
        "actual_sparsity": pruned / total if total else 0.0,
        "pruned_params": int(round(pruned)),
        "prunable_params": total,
    }
    if any(isinstance(lin, SparsePlusLowRank) for lin in linears.values()):
        out.update(compression(linears, per_tensor))
    return out


def count_report(
    linears: dict[str, nn.Linear], sparsity: float | dict[str, float], pattern: Pattern, group: str
) -> dict[str, object]:
    """How far the actual sparsity may lie from the target, and why: the method's count rule
    in words and the range of actual sparsity its masks may have (what `verify` accepts),
    summed over every pruned linear (results.json sparsity.count_rule, sparsity.allowed)."""
    total = low = high = 0
    for name, linear in linears.items():
        target = sparsity[name] if isinstance(sparsity, dict) else sparsity
        lo, hi = pruned_bounds(tuple(linear.weight.shape), target, pattern, group)
        total, low, high = total + linear.weight.numel(), low + lo, high + hi
    return {"count_rule": count_rule(group, pattern), "allowed": [low / total, high / total]}
