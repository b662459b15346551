"""The model's side of the plan: tensor counts read from its meta-device shapes, and the
byte sizes every term is made of."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

GIB = 2**30
PHASES = ("always", "backward", "update", "end")  # see "Phases" above
ADAM8_BLOCK = 2048  # engine/adam8bit.py: one float32 scale (two for v) per block of 2048
FORMAT_BYTES = {"float32": 4, "bfloat16": 2, "fp8": 1}


@dataclass
class Shapes:
    params: int
    prunable: int
    blocks: int
    hidden: int
    vocab: int
    embeddings: int  # input + output embedding parameters (counted once when tied)
    block_params: int  # the largest block's parameters
    block_linear_params: int  # the largest block's prunable parameters
    act_per_token: int  # elements saved per token and block for the backward
    hessian_elems: int  # `hessian`: one Gram matrix per distinct input of the largest block
    max_in: int  # the widest linear input (the largest Hessian's side)
    group_elems: int  # the largest set of linears sharing one input (q/k/v, gate/up), in weights
    norm_elems: int  # `norms`: one norm per input column of the largest block's linears
    largest_linear: tuple[int, int]
    dtype_bytes: int
    largest_param: int = 0  # the largest parameter's elements (the embeddings, usually)
    # 8-bit Adam's state (engine/adam8bit.py), exactly, for what a run may train
    adam8_all: int = 0
    adam8_linears: int = 0
    adam8_embeddings: int = 0
    prunable_rows: int = 0  # output rows of every pruned linear (CSR row pointers)


# linears that read their parent's input: q/k/v, gate/up, and a fused projection's parts
SHARED_INPUT = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "q", "k", "v", "gate", "up"}


def shapes_of(model: nn.Module) -> Shapes:
    from ..engine.adam8bit import state_bytes as adam8_bytes
    from ..models import find_blocks, find_linears, is_expert

    _, blocks = find_blocks(model)
    params = sum(p.numel() for p in model.parameters())
    emb = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight.numel()}
    if model.get_output_embeddings() is not None:
        emb[id(model.get_output_embeddings().weight)] = model.get_output_embeddings().weight.numel()
    best = max(blocks, key=lambda b: sum(p.numel() for p in b.parameters()))
    lins = find_linears(best)
    hidden = (
        model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    )
    # distinct inputs: linears reading the same tensor (q/k/v, gate/up, a fused projection's
    # parts) share one Hessian; in a block those are the linears of one parent module (the
    # attention, the MLP, one expert, one fused projection) that read its input, so everything
    # but o_proj and down_proj reads one of them. Each expert of a mixture has its own.
    distinct: dict[tuple[str, str], int] = {}
    group: dict[tuple[str, str], int] = {}
    for name, lin in lins.items():
        parent, _, leaf = name.rpartition(".")
        key = (parent, "in") if leaf in SHARED_INPUT else (name, "")
        distinct[key] = lin.in_features
        group[key] = group.get(key, 0) + lin.weight.numel()
    mlp_mid = max(lin.in_features for lin in lins.values())
    # saved activations per token: an expert's linears run only on the tokens routed to it
    experts = sum(1 for n in lins if n.endswith("gate_proj") and is_expert(n))
    share = min(1.0, getattr(model.config, "num_experts_per_tok", 1) / experts) if experts else 1.0
    outs = sum(lin.out_features * (share if is_expert(n) else 1.0) for n, lin in lins.items())
    return Shapes(
        params=params,
        prunable=sum(lin.weight.numel() for b in blocks for lin in find_linears(b).values()),
        prunable_rows=sum(lin.out_features for b in blocks for lin in find_linears(b).values()),
        blocks=len(blocks),
        hidden=hidden,
        vocab=model.config.vocab_size,
        embeddings=sum(emb.values()),
        block_params=sum(p.numel() for p in best.parameters()),
        block_linear_params=sum(lin.weight.numel() for lin in lins.values()),
        act_per_token=int(outs) + 2 * hidden + mlp_mid,
        hessian_elems=sum(c * c for c in distinct.values()),
        max_in=max(distinct.values()),
        group_elems=max(group.values()),
        norm_elems=sum(lin.in_features for lin in lins.values()),
        largest_linear=max(
            ((lin.out_features, lin.in_features) for lin in lins.values()),
            key=lambda s: s[0] * s[1],
        ),
        dtype_bytes=next(model.parameters()).element_size(),
        largest_param=max(p.numel() for p in model.parameters()),
        adam8_all=sum(adam8_bytes(tuple(p.shape)) for p in model.parameters()),
        adam8_linears=sum(
            adam8_bytes(tuple(lin.weight.shape)) for b in blocks for lin in find_linears(b).values()
        ),
        adam8_embeddings=sum(
            adam8_bytes(tuple(p.shape))
            for p in {
                id(p): p
                for p in (
                    model.get_input_embeddings().weight,
                    *(
                        [model.get_output_embeddings().weight]
                        if model.get_output_embeddings() is not None
                        else []
                    ),
                )
            }.values()
        ),
    )
