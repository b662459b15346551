"""Linears that read the same input, multiplied as one matrix (`eval.speed.fuse`, on by default).

A Llama block's q, k and v projections read the same hidden state, and so do the MLP's gate and
up; serving runtimes (llama.cpp, vLLM) multiply each such group as one matrix of the members'
rows stacked. For a sparse kernel that matters more than for a dense one: a small matrix pays
its threads' and its read streams' start-up once a call, so on SmolLM2's shapes (2 threads,
env B, from memory) q / k / v at 0.5 took 47-62 us as three products and 46-47 as one, gate /
up 170-174 and 129-132, where dense (MKL) gained 1-6% (docs/notes/2026-12-07-env-b.md). In
the library the sparse units of SmolLM2 took 7-19% less time than its linears one by one,
while the whole token moved within +-3% (docs/notes/2026-12-07-fusion.md). The speed
measurement fuses both sides alike, so the ratio compares like with like. A stacked unit is a
copy: while the speed is measured the grouped weights are held twice (`eval.speed.fuse=false`
where that does not fit).

Which linears share an input is found, not assumed per family: one short forward with a hook
on each pruned linear records the tensor each receives; linears handed the very same tensor
(same object, same version counter, so unmodified in between) form a group. At run time
each member asks its group for the product of its input: the first member's call computes the
whole group's output, the others slice it, and an input that is not the one the product was
computed for (another object, or the same one modified in place) is multiplied afresh, so a
member never returns a stale result.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from .kernels import SparseLinear, merged_in, swap_out


def _version(x: torch.Tensor) -> int | None:
    # an inference-mode tensor has no version counter (and cannot be modified in place outside
    # inference mode): its identity alone names it
    return None if x.is_inference() else x._version


@torch.no_grad()
def shared_inputs(model: nn.Module, names: list[str], input_ids: torch.Tensor) -> list[list[str]]:
    """Groups (two or more members, in call order) of the named linears that one forward of
    `input_ids` hands the same input tensor; each linear's first call counts."""
    seen: dict[str, tuple[torch.Tensor, int | None]] = {}

    def hook(name):
        def record(module, args):
            if name not in seen:
                seen[name] = (args[0], _version(args[0]))  # held: no id is reused meanwhile

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    keys: list[tuple] = []  # each group's input, its version, and its weights' dtype and device
    for name, (x, version) in seen.items():
        w = model.get_submodule(name).weight
        key = (x, version, w.dtype, w.device)
        i = next((i for i, k in enumerate(keys) if k[0] is x and k[1:] == key[1:]), None)
        if i is None:
            groups.append([name])
            keys.append(key)
        else:
            groups[i].append(name)
    return [g for g in groups if len(g) > 1]


def stacked(linears: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose rows are the members' rows in order (a copy), biases alike (zeros
    for a member without one)."""
    w = torch.cat([lin.weight.detach() for lin in linears])
    out = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    out.weight = nn.Parameter(w, requires_grad=False)
    if any(lin.bias is not None for lin in linears):
        bias = [
            lin.bias.detach() if lin.bias is not None else w.new_zeros(lin.out_features)
            for lin in linears
        ]
        out.bias = nn.Parameter(torch.cat(bias), requires_grad=False)
    return out


def unit_name(group: list[str]) -> str:
    """'model.layers.0.self_attn.q_proj+k_proj+v_proj': the first member's full name, then the
    others' last parts."""
    return "+".join([group[0], *(n.rpartition(".")[2] for n in group[1:])])


def units(linears: dict[str, nn.Module], groups: list[list[str]]) -> dict[str, nn.Module]:
    """What the kernels multiply: each group as one stacked linear, every other linear as is."""
    grouped = {n for g in groups for n in g}
    out = {unit_name(g): stacked([linears[n] for n in g]) for g in groups}
    out.update({n: lin for n, lin in linears.items() if n not in grouped})
    return out


class SharedProduct:
    """A group's product, computed once per input and kept for the members that read it."""

    def __init__(self, unit: nn.Module):
        self.unit = unit
        self.x: torch.Tensor | None = None
        self.version: int | None = None
        self.y: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        version = _version(x)
        if x is not self.x or version != self.version:
            self.y = self.unit(x)
            self.x, self.version = x, version
        return self.y


class FusedMember(nn.Module):
    """One member of a group: its columns of the group's output (rows start:stop of the stacked
    weight). Counts its calls like SparseLinear."""

    def __init__(self, product: SharedProduct, start: int, stop: int):
        super().__init__()
        self.product, self.start, self.stop = product, start, stop
        self.unit = product.unit  # a submodule of every member: what state_dict and .to() see
        self._calls = [0]

    @property
    def calls(self) -> int:
        return self._calls[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._calls[0] += 1
        # one token's slice is contiguous already (no copy); a batch's is copied, as the
        # attention's view() of a member's output may need
        return self.product(x)[..., self.start : self.stop].contiguous()


def sides(
    model: nn.Module, linears: dict, units: dict, groups: list, factored: dict, tiers: tuple
) -> dict[str, dict]:
    """The modules at the pruned linears' names for each side of the comparison, built once: the
    run's own (`original`), the dense product's (a merged S + U V linear where OATS factored
    one) and the sparse kernels' (SparseLinear of the kernel `tiers`), a group of linears that
    read one input multiplied as its one stacked unit on both sides."""
    out = {"original": dict(linears)}
    merged_in(model, factored)  # a factored linear is in no group: its dense side is S + U V
    dense = {u: model.get_submodule(u) if u in factored else lin for u, lin in units.items()}
    swap_out(model, out["original"])
    out["dense"] = members(groups, linears, dense)
    sparse = {u: SparseLinear(lin, *tiers) for u, lin in units.items()}  # the original's form
    out["sparse"] = members(groups, linears, sparse)
    return out


def members(
    groups: list[list[str]], linears: dict[str, nn.Module], unit_modules: dict[str, nn.Module]
) -> dict[str, nn.Module]:
    """The module to put at each pruned linear's name: a FusedMember of its group's unit, or the
    unit itself for a linear in no group."""
    out = {}
    for g in groups:
        product, start = SharedProduct(unit_modules[unit_name(g)]), 0
        for n in g:
            stop = start + linears[n].out_features
            out[n] = FusedMember(product, start, stop)
            start = stop
    grouped = set(out)
    out.update({n: unit_modules[n] for n in linears if n not in grouped})
    return out


def distinct_units(modules) -> list[nn.Module]:
    """The units behind the placed modules, each once (a group's unit is behind its members)."""
    seen: dict[int, nn.Module] = {}
    for m in modules:
        unit = m.unit if isinstance(m, FusedMember) else m
        seen.setdefault(id(unit), unit)
    return list(seen.values())


def summary(groups: list[list[str]]) -> dict[str, int]:
    """How many groups of each kind: {'q_proj+k_proj+v_proj': 30, 'gate_proj+up_proj': 30}."""
    return dict(Counter("+".join(n.rpartition(".")[2] for n in g) for g in groups))
