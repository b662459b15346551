"""The model map: what sparsebench prunes in each family's decoder blocks, and what it keeps.

Every weight of a decoder block is one of:

  pruned  each projection, as an nn.Linear. Plain in Llama, Mistral, Qwen2.5 / Qwen3, Gemma-2 /
          Gemma-3, OPT. GPT-2's Conv1D (a transposed weight) becomes the nn.Linear it computes.
          A fused projection is pruned as its parts: GPT-2 `c_attn` and Phi-3 `qkv_proj` as
          q, k, v; Phi-3 `gate_up_proj` as gate, up; GPT-NeoX / Pythia and Falcon
          `query_key_value` as q, k, v in their own row layout (NeoX: per head q, k, v
          interleaved). So a fused and a split model with the same weights get the same masks: a
          per-tensor threshold (magnitude, ADMM) or SparseGPT's column blocks never mix q with v.
          A mixture of experts (Mixtral, Qwen3-MoE, OLMoE) prunes each expert's gate, up and down
          as linears of their own, each with the statistics of the tokens routed to it.
  kept    norms (a module whose class name has "Norm"), biases, the routers of a mixture of
          experts (a module whose class name has "Router"); embeddings and lm_head live outside
          the blocks and are never pruned.

Anything else stops the run before any work (`check_coverage`), never a silent skip.

`adapt(model)` rewrites the model in place after loading: each replaced module computes what
the original computed, from the same weights, with the parts as nn.Linear children, so the
driver's statistics hooks, the masks, training and FSDP2 all see plain linears. An export is
written in the family's own layout (`original_state_dict`), which transformers loads; `adapt`
on reload gives the masks their names back.
"""

from __future__ import annotations

import torch
from torch import nn


class SplitLinear(nn.Module):
    """A fused projection as its parts: `parts[name]` are the fused output rows of each part.
    The forward returns the fused output (same columns, same order) from the parts' linears."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, parts: dict[str, torch.Tensor]
    ):
        super().__init__()
        self.part_names = list(parts)
        rows = torch.cat([parts[n] for n in self.part_names])
        assert sorted(rows.tolist()) == list(range(weight.shape[0])), (
            "parts must cover every row once"
        )
        for name in self.part_names:
            idx = parts[name]
            lin = nn.Linear(
                weight.shape[1],
                len(idx),
                bias=bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            with torch.no_grad():
                lin.weight.copy_(weight[idx])
                if bias is not None:
                    lin.bias.copy_(bias[idx])
            setattr(self, name, lin)
        # the fused order of the concatenated parts' outputs (None: already in order)
        order = torch.argsort(rows)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer(
            "order",
            None if torch.equal(order, torch.arange(len(rows))) else order,
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([getattr(self, n)(x) for n in self.part_names], dim=-1)
        return y if self.order is None else y.index_select(-1, self.order)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) in the fused layout."""
        lins = [getattr(self, n) for n in self.part_names]
        weight = torch.empty(
            len(self.rows),
            lins[0].in_features,
            dtype=lins[0].weight.dtype,
            device=lins[0].weight.device,
        )
        weight[self.rows] = torch.cat([lin.weight.detach() for lin in lins])
        if lins[0].bias is None:
            return weight, None
        bias = torch.empty(len(self.rows), dtype=lins[0].bias.dtype, device=lins[0].bias.device)
        bias[self.rows] = torch.cat([lin.bias.detach() for lin in lins])
        return weight, bias


class LinearExperts(nn.Module):
    """A mixture of experts' fused expert tensors (E x 2I x H gate_up, E x H x I down) as one
    gate_proj / up_proj / down_proj nn.Linear per expert; the forward is transformers' expert
    loop (Mixtral, Qwen3-MoE, OLMoE): each expert runs on the tokens routed to it, weighted and
    added back. The experts are children "0".."E-1" of this module (`mlp.experts.3.gate_proj`),
    not a ModuleList, so they are never mistaken for the decoder blocks."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn):
        super().__init__()
        self.num_experts, two_i, hidden = gate_up.shape
        inter = two_i // 2
        self.act_fn = act_fn
        for e in range(self.num_experts):
            expert = nn.Module()
            for name, w in (
                ("gate_proj", gate_up[e, :inter]),
                ("up_proj", gate_up[e, inter:]),
                ("down_proj", down[e]),
            ):
                lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    lin.weight.copy_(w)
                setattr(expert, name, lin)
            self.add_module(str(e), expert)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():  # as transformers: index num_experts marks a token dropped by routing
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(
                2, 1, 0
            )
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = int(e[0])
            if e == self.num_experts:
                continue
            pos, token = torch.where(mask[e])
            expert = self.get_submodule(str(e))
            x = hidden_states[token]
            h = self.act_fn(expert.gate_proj(x)) * expert.up_proj(x)
            out = expert.down_proj(h) * top_k_weights[token, pos, None]
            final.index_add_(0, token, out.to(final.dtype))
        return final

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up E x 2I x H, down E x H x I) in transformers' layout."""
        experts = [self.get_submodule(str(e)) for e in range(self.num_experts)]
        gate_up = torch.stack(
            [torch.cat([x.gate_proj.weight.detach(), x.up_proj.weight.detach()]) for x in experts]
        )
        down = torch.stack([x.down_proj.weight.detach() for x in experts])
        return gate_up, down


# ----------------------------------------------------------------------------- fused layouts


def _ranges(*sizes: int) -> list[torch.Tensor]:
    out, start = [], 0
    for n in sizes:
        out.append(torch.arange(start, start + n))
        start += n
    return out


def neox_qkv(heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """GPT-NeoX / Pythia (and Falcon without multi-query): per head, q, k, v rows in turn."""
    base = torch.arange(heads)[:, None] * 3 * head_dim
    within = torch.arange(head_dim)[None, :]
    return {p: (base + i * head_dim + within).flatten() for i, p in enumerate(("q", "k", "v"))}


def grouped_qkv(heads: int, kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Falcon's new decoder architecture: per key-value group, its query heads, then k, then v."""
    per = heads // kv_heads + 2
    group = torch.arange(kv_heads)[:, None, None] * per * head_dim
    within = torch.arange(head_dim)[None, None, :]
    q = group + (torch.arange(per - 2)[None, :, None] * head_dim) + within
    k = group + (per - 2) * head_dim + within
    v = group + (per - 1) * head_dim + within
    return {"q": q.flatten(), "k": k.flatten(), "v": v.flatten()}


def concatenated(**sizes: int) -> dict[str, torch.Tensor]:
    """Parts one after the other (Phi-3 qkv_proj and gate_up_proj, GPT-2 c_attn)."""
    return dict(zip(sizes, _ranges(*sizes.values())))


def _fused_layout(config, owner: str, name: str) -> dict[str, torch.Tensor] | None:
    """The parts of a fused projection `name` in a module of class `owner`, or None."""
    mt = config.model_type
    hidden = config.hidden_size if hasattr(config, "hidden_size") else config.n_embd
    heads = config.num_attention_heads if hasattr(config, "num_attention_heads") else config.n_head
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if mt == "gpt2" and name == "c_attn":
        return concatenated(q=hidden, k=hidden, v=hidden)
    if mt == "gpt_neox" and name == "query_key_value":
        return neox_qkv(heads, hidden // heads)
    if mt == "phi3" and name == "qkv_proj":
        kv = config.num_key_value_heads
        return concatenated(q=heads * head_dim, k=kv * head_dim, v=kv * head_dim)
    if mt == "phi3" and name == "gate_up_proj":
        return concatenated(gate=config.intermediate_size, up=config.intermediate_size)
    if mt == "falcon" and name == "query_key_value":
        head_dim = hidden // heads
        if config.new_decoder_architecture:
            return grouped_qkv(heads, config.num_kv_heads, head_dim)
        if config.multi_query:
            return concatenated(q=heads * head_dim, k=head_dim, v=head_dim)
        return neox_qkv(heads, head_dim)
    return None


# ----------------------------------------------------------------------------- adapt / restore


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def adapt(model: nn.Module) -> nn.Module:
    """Rewrite fused projections, Conv1D and fused experts as nn.Linear modules, in place."""
    config = model.config
    transposed = []  # Conv1D modules: their export is transposed back
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            weight = bias = None
            if _is_conv1d(child):  # x @ W + b with W (in, out): the linear of W^T
                weight, bias = child.weight.detach().t(), child.bias
                transposed.append(f"{parent_name}.{name}".lstrip("."))
            elif isinstance(child, nn.Linear):
                weight, bias = child.weight.detach(), child.bias
            if weight is not None:
                layout = _fused_layout(config, type(parent).__name__, name)
                if layout is not None:
                    setattr(
                        parent,
                        name,
                        SplitLinear(weight, None if bias is None else bias.detach(), layout),
                    )
                elif _is_conv1d(child):
                    lin = nn.Linear(
                        weight.shape[1],
                        weight.shape[0],
                        bias=bias is not None,
                        device=weight.device,
                        dtype=weight.dtype,
                    )
                    with torch.no_grad():
                        lin.weight.copy_(weight)
                        if bias is not None:
                            lin.bias.copy_(bias)
                    setattr(parent, name, lin)
            elif (
                hasattr(child, "gate_up_proj")
                and isinstance(getattr(child, "gate_up_proj"), nn.Parameter)
                and getattr(child, "gate_up_proj").dim() == 3
            ):
                setattr(
                    parent,
                    name,
                    LinearExperts(
                        child.gate_up_proj.detach(), child.down_proj.detach(), child.act_fn
                    ),
                )
    if transposed:
        model.sparsebench_transposed = sorted(transposed)
    return model


def original_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in the family's own layout (what transformers loads)."""
    state = {}
    replaced = {}
    for name, module in model.named_modules():
        if isinstance(module, (SplitLinear, LinearExperts)):
            replaced[name] = module
    conv = _conv1d_names(model)
    for key, value in model.state_dict().items():
        if key.endswith((".lowrank_u", ".lowrank_v")):  # OATS's factors: their own file
            continue
        owner = next((n for n in replaced if key.startswith(n + ".")), None)
        if owner is None:
            state[key] = (
                value.t().contiguous()
                if key.rpartition(".")[0] in conv and key.endswith(".weight")
                else value
            )
    for name, module in replaced.items():
        if isinstance(module, SplitLinear):
            weight, bias = module.fused()
            transposed = name in conv
            state[f"{name}.weight"] = weight.t().contiguous() if transposed else weight
            if bias is not None:
                state[f"{name}.bias"] = bias
        else:
            gate_up, down = module.fused()
            state[f"{name}.gate_up_proj"], state[f"{name}.down_proj"] = gate_up, down
    return state


def original_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keep masks by the family's own parameter names and layouts (`original_state_dict`'s):
    a fused projection's assembled from its parts, Conv1D's transposed, experts' stacked."""
    conv = _conv1d_names(model)
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for name, module in modules.items():
        if isinstance(module, SplitLinear):
            keep = torch.empty(
                len(module.rows),
                getattr(module, module.part_names[0]).in_features,
                dtype=torch.bool,
            )
            keep[module.rows.cpu()] = torch.cat(
                [masks[f"{name}.{p}"].cpu() for p in module.part_names]
            )
            out[f"{name}.weight"] = keep.t().contiguous() if name in conv else keep
            done.update(f"{name}.{p}" for p in module.part_names)
        elif isinstance(module, LinearExperts):
            e = range(module.num_experts)
            out[f"{name}.gate_up_proj"] = torch.stack(
                [
                    torch.cat(
                        [masks[f"{name}.{i}.gate_proj"].cpu(), masks[f"{name}.{i}.up_proj"].cpu()]
                    )
                    for i in e
                ]
            )
            out[f"{name}.down_proj"] = torch.stack(
                [masks[f"{name}.{i}.down_proj"].cpu() for i in e]
            )
            done.update(f"{name}.{i}.{p}" for i in e for p in ("gate_proj", "up_proj", "down_proj"))
    for name, keep in masks.items():
        if name not in done:
            out[f"{name}.weight"] = keep.t().contiguous() if name in conv else keep
    return out


def masks_from_original(
    model: nn.Module, original: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The inverse of `original_masks`: keep masks by the adapted model's linear names from
    masks in the family's own layout (a bitmask export's bits, which hold the masks once)."""
    conv = _conv1d_names(model)
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, SplitLinear) and f"{name}.weight" in original:
            keep = original[f"{name}.weight"]
            keep = (keep.t() if name in conv else keep)[module.rows.cpu()]
            sizes = [getattr(module, p).out_features for p in module.part_names]
            for part, rows in zip(module.part_names, keep.split(sizes)):
                out[f"{name}.{part}"] = rows.contiguous()
        elif isinstance(module, LinearExperts) and f"{name}.gate_up_proj" in original:
            gate_up, down = original[f"{name}.gate_up_proj"], original[f"{name}.down_proj"]
            inter = gate_up.shape[1] // 2
            for e in range(module.num_experts):
                out[f"{name}.{e}.gate_proj"] = gate_up[e, :inter].contiguous()
                out[f"{name}.{e}.up_proj"] = gate_up[e, inter:].contiguous()
                out[f"{name}.{e}.down_proj"] = down[e].contiguous()
        elif isinstance(module, nn.Linear) and f"{name}.weight" in original:
            keep = original[f"{name}.weight"]
            out[name] = (keep.t() if name in conv else keep).contiguous()
    return out


def relaid(model: nn.Module) -> list[str]:
    """Modules sparsebench presents in another layout than the family stores (split fused
    projections, unfused experts, Conv1D as Linear): empty when the saved layout is the
    model's own linears."""
    split = [n for n, m in model.named_modules() if isinstance(m, (SplitLinear, LinearExperts))]
    return split + sorted(_conv1d_names(model))


def _conv1d_names(model: nn.Module) -> set[str]:
    """Modules that were Conv1D in the family's layout (GPT-2): recorded by `adapt`."""
    return set(getattr(model, "sparsebench_transposed", ()))


# ----------------------------------------------------------------------------- the map, printed


def _pattern(names: list[str]) -> list[str]:
    """Expert indices folded: mlp.experts.{0..7}.gate_proj for eight names that differ in it."""
    import re

    groups: dict[str, list[int]] = {}
    out = []
    for n in names:
        m = re.search(r"\.experts\.(\d+)\.", n)
        if m is None:
            out.append(n)
            continue
        key = n[: m.start()] + ".experts.{}." + n[m.end() :]
        if key not in groups:
            out.append(key)
        groups.setdefault(key, []).append(int(m.group(1)))
    return [
        f"{k.replace('{}', '{' + f'{min(groups[k])}..{max(groups[k])}' + '}')}"
        if k in groups
        else k
        for k in out
    ]


def model_map(model: nn.Module) -> dict:
    """What is pruned and what is kept in the model's first decoder block (every block of the
    supported families has the same parts), after `adapt`."""
    from .cut import cuts_of
    from .models import find_blocks, find_linears, kept_reason

    path, blocks = find_blocks(model)
    block = blocks[0]
    linears = find_linears(block)
    pruned_ids = {id(lin.weight) for lin in linears.values()}
    modules = dict(block.named_modules())
    kept: dict[str, list[str]] = {}
    for name, param in block.named_parameters():
        if id(param) in pruned_ids:
            continue
        reason = (
            kept_reason(modules.get(name.rpartition(".")[0], block), name, param) or "not covered"
        )
        kept.setdefault(reason, []).append(name)
    numel = sum(p.numel() for b in blocks for p in b.parameters())
    pruned = sum(lin.weight.numel() for b in blocks for lin in find_linears(b).values())
    return {
        "family": model.config.model_type,
        "blocks": f"{path}.0..{len(blocks) - 1}",
        "pruned": _pattern(list(linears)),
        "kept": {k: _pattern(v) for k, v in kept.items()},
        "never": ["embeddings", "lm_head", "final norm"],
        "prunable_params": pruned,
        "block_params": numel,
        "cuts": cuts_of(model, block),
    }


def map_lines(m: dict) -> list[str]:
    parts = []
    for why, names in m["kept"].items():
        shown = names if why != "bias" or len(names) <= 2 else [f"the {len(names)} linears' biases"]
        parts.append(f"{why}: {', '.join(shown)}")
    kept = "; ".join(parts) or "nothing"
    return [
        f"model map ({m['family']}, blocks {m['blocks']}): prunes {', '.join(m['pruned'])}",
        f"  keeps {kept}; never pruned: {', '.join(m['never'])}",
        f"  {m['prunable_params']:,} of the blocks' {m['block_params']:,} weights are prunable "
        f"({m['prunable_params'] / m['block_params']:.2%}); structured cuts: "
        + ", ".join(m.get("cuts") or ["none"]),
    ]
