"""Narrower blocks: attention heads and MLP channels removed from a decoder block (FLAP's cut).

The units a width cut removes, per block (`parts_of`):
- attention: a key/value group, i.e. one key/value head with its g query heads (g = 1 for
  multi-head attention): the q rows of its query heads, the k and v rows of its head, the
  o_proj columns of its query heads. A group is never half-removed, so grouped attention's
  ratio of query to key/value heads stays the one the module computes with.
- MLP: one intermediate channel: its row of gate_proj and up_proj (fc1 where the MLP is not
  gated) and its column of down_proj (fc2).

`shrink` cuts the modules to the kept units in place (nn.Linear objects replaced by smaller
ones, the attention module's head counts updated where it keeps them) and adds a bias to
the output projection when one is given: FLAP's compensation, the removed channels' mean
input times their columns. Blocks may end with different widths; such a model has no
transformers config (one width per model), so the export records every block's widths
(`widths_of`) and `reshape_to` rebuilds the modules at those shapes before loading
(formats.load_into).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SparsebenchError
from ..models import is_expert

ATTENTION_OUT = ("o_proj", "out_proj")
MLP_IN = (("gate_proj", "up_proj"), ("fc1",))
MLP_OUT = ("down_proj", "fc2")


@dataclass
class Parts:
    """The linears of one block that a width cut touches."""

    attention: nn.Module  # the module holding q/k/v/o (head counts live there)
    q: str
    k: str
    v: str
    o: str
    head_dim: int
    group: int  # query heads per key/value head
    mlp: nn.Module  # the module holding the MLP's linears (the block itself for OPT)
    ins: tuple[str, ...]  # gate, up (or fc1): rows are channels
    out: str  # down (or fc2): columns are channels

    @property
    def kv_heads(self) -> int:
        return getattr(self.attention, self.k).out_features // self.head_dim

    @property
    def channels(self) -> int:
        return getattr(self.mlp, self.out).in_features

    def unit_params(self) -> tuple[int, int]:
        """Weights of one key/value group and of one MLP channel (FLAP's compression weights)."""
        hidden = getattr(self.attention, self.o).out_features
        return (2 * self.group + 2) * self.head_dim * hidden, (len(self.ins) + 1) * hidden


def parts_of(block: nn.Module, config) -> Parts:
    """The attention and MLP linears of a decoder block with separate q/k/v/o projections and a
    (gated or plain) MLP; one line for a family whose block is laid out otherwise."""
    if any(is_expert(name) for name, _ in block.named_modules()):
        raise SparsebenchError(
            f"{type(block).__name__} routes tokens to experts: a width cut of a mixture of "
            "experts (each expert's channels) is not built; its attention and experts are cut "
            "by other methods (docs/methods.md)"
        )
    attention = next(
        (m for m in block.modules() if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj"))),
        None,
    )
    o = next((n for n in ATTENTION_OUT if attention is not None and hasattr(attention, n)), None)
    mlp, ins, out = None, None, None
    for module in block.modules():
        for names in MLP_IN:
            if all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
                out = next(
                    (n for n in MLP_OUT if isinstance(getattr(module, n, None), nn.Linear)), None
                )
                mlp, ins = (module, names) if out else (None, None)
        if mlp is not None:
            break
    if attention is None or o is None or mlp is None:
        raise SparsebenchError(
            f"{type(block).__name__}: a width cut needs separate q/k/v/o projections and an MLP "
            "of gate/up/down (or fc1/fc2) linears; this family fuses them or routes experts "
            "(docs/methods.md lists the families it runs on)"
        )
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    kv = kv or heads
    head_dim = (  # the module's own (a cut changes the projections' widths, not this)
        getattr(attention, "head_dim", None)
        or getattr(config, "head_dim", None)
        or config.hidden_size // heads
    )
    return Parts(attention, "q_proj", "k_proj", "v_proj", o, head_dim, heads // kv, mlp, ins, out)


def _rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(index), linear.bias is not None)
    new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[index])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[index])
    return new


def _columns(linear: nn.Linear, index: torch.Tensor, add_bias: torch.Tensor | None) -> nn.Linear:
    has_bias = linear.bias is not None or add_bias is not None
    new = nn.Linear(len(index), linear.out_features, has_bias)
    new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, index])
        if has_bias:
            new.bias.zero_()
            if linear.bias is not None:
                new.bias.add_(linear.bias)
            if add_bias is not None:
                new.bias.add_(add_bias.to(new.bias.dtype))
    return new


def channels_of_groups(keep_groups: torch.Tensor, group: int, head_dim: int):
    """(q channels, k/v channels) of the kept key/value groups, in order."""
    kv = torch.nonzero(keep_groups).flatten()
    q_heads = (kv[:, None] * group + torch.arange(group)).flatten()
    expand = lambda heads: (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()  # noqa: E731
    return expand(q_heads), expand(kv)


def shrink(
    parts: Parts,
    keep_groups: torch.Tensor,
    keep_channels: torch.Tensor,
    attn_bias: torch.Tensor | None = None,
    mlp_bias: torch.Tensor | None = None,
) -> None:
    """Cut one block to its kept key/value groups and MLP channels, in place; the biases are
    added to the output projections (o, down)."""
    a, m = parts.attention, parts.mlp
    q_idx, kv_idx = channels_of_groups(keep_groups.cpu(), parts.group, parts.head_dim)
    setattr(a, parts.q, _rows(getattr(a, parts.q), q_idx))
    setattr(a, parts.k, _rows(getattr(a, parts.k), kv_idx))
    setattr(a, parts.v, _rows(getattr(a, parts.v), kv_idx))
    setattr(a, parts.o, _columns(getattr(a, parts.o), q_idx, attn_bias))
    kept = int(keep_groups.sum())
    for name, value in (("num_heads", kept * parts.group), ("num_key_value_heads", kept)):
        if isinstance(getattr(a, name, None), int):  # modules that reshape by a stored count
            setattr(a, name, value)
    ch = torch.nonzero(keep_channels.cpu()).flatten()
    for name in parts.ins:
        setattr(m, name, _rows(getattr(m, name), ch))
    setattr(m, parts.out, _columns(getattr(m, parts.out), ch, mlp_bias))


def widths_of(model: nn.Module, blocks) -> list[dict[str, int]]:
    """Every block's kept key/value heads and MLP channels (what an export records)."""
    out = []
    for block in blocks:
        p = parts_of(block, model.config)
        out.append({"kv_heads": p.kv_heads, "channels": p.channels})
    return out


# config keys that switch on the biases of a family's attention and MLP linears (Llama-style)
BIAS_KEYS = ("attention_bias", "mlp_bias")


def plain_config(model: nn.Module, blocks) -> bool:
    """Where every block kept the same widths, say them in the model's config (head counts,
    head_dim, intermediate size; the compensation biases through the family's bias switches,
    the other projections then holding zero biases that add exactly nothing), so the export
    loads with plain `from_pretrained`. Only when a model built from the new config has
    exactly the cut model's parameter names and shapes; otherwise nothing changes (False) and
    the export records the widths for sparsebench's loader (`reshape_to`)."""
    widths = widths_of(model, blocks)
    if len({(w["kv_heads"], w["channels"]) for w in widths}) != 1:
        return False
    from transformers import AutoModelForCausalLM

    p = parts_of(blocks[0], model.config)
    has = {n: t for n, t in model.named_parameters()}
    new = {
        "num_key_value_heads": p.kv_heads,
        "num_attention_heads": p.kv_heads * p.group,
        "head_dim": p.head_dim,
        "intermediate_size": p.channels,
    }
    if any(n.endswith(".bias") for n in has):
        new.update({k: True for k in BIAS_KEYS if hasattr(model.config, k)})
    config = model.config.__class__.from_dict({**model.config.to_dict(), **new})
    with torch.device("meta"):
        probe = AutoModelForCausalLM.from_config(config)
    want = {n: tuple(t.shape) for n, t in probe.named_parameters()}
    extra = set(want) - set(has)  # only zero biases may be added
    if any(not n.endswith(".bias") for n in extra) or set(has) - set(want):
        return False
    if any(want[n] != tuple(has[n].shape) for n in has):
        return False
    modules = dict(model.named_modules())
    for name in sorted(extra):
        linear = modules[name.removesuffix(".bias")]
        linear.bias = nn.Parameter(
            torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
        )
    for key, value in new.items():  # the model's own config object (its modules share it)
        setattr(model.config, key, value)
    return True


def reshape_to(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Rebuild every nn.Linear whose stored weight (or bias) in `state` has another shape at
    the stored one (a width cut's export into a full-size model of its config), and set the
    head counts attention modules reshape by; nothing changes for a model of the same shapes."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}".lstrip(".")
            w = state.get(f"{full}.weight")
            if not isinstance(child, nn.Linear) or w is None:
                continue
            has_bias = f"{full}.bias" in state
            if tuple(w.shape) != tuple(child.weight.shape) or has_bias != (child.bias is not None):
                new = nn.Linear(w.shape[1], w.shape[0], has_bias)
                setattr(module, child_name, new.to(dtype=child.weight.dtype))
    for module in model.modules():
        q, hd = getattr(module, "q_proj", None), getattr(module, "head_dim", None)
        if isinstance(q, nn.Linear) and isinstance(hd, int) and hd:
            for attr, value in (
                ("num_heads", q.out_features // hd),
                ("num_key_value_heads", module.k_proj.out_features // hd),
            ):
                if isinstance(getattr(module, attr, None), int):
                    setattr(module, attr, value)
