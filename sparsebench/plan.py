"""The memory plan: what a run will hold, per rank, before anything is loaded.

Built from the model's meta-device shapes (no weights, no download: hub models read their
config, random ones their `arch`) and the terms the run's method and recovery declare
(`plan_terms(device)` -> `Terms`): this file does the arithmetic and knows no method by name.
Every term is a tensor count times its dtype's bytes, for the stated micro-batch and seqlen;
there are no fitted factors. A method or recovery that declares no terms is refused here,
never planned without them.

  oneshot  block by block with input statistics: the model on the host; on the compute
      device one block (two while the next is prefetched), the calibration inputs and
      outputs of a block (n x seqlen x hidden, model dtype), the declared statistics of the
      block (`norms`: one per input column; `hessian`: one Gram matrix per distinct input,
      plus the prune-time copies of one linear: damped H, its inverse factor, the weight in
      float32; `gram_eig` / `gram_inv`: the Gram matrices and an ADMM solve's copies) and
      one window's forward through the block
  blockwise  one-shot's terms, inputs and dense targets in float32, and one block in
      training: float32 weights, gradients, Adam's two moments, the declared z and u of its
      linears, the saved activations of a batch through the block
  train  the whole model in training: float32 master weights, gradients and Adam's moments
      of every trained parameter (8-bit moments: 2 bytes + block scales), the declared z and
      u of the pruned linears in their formats, activations saved for the backward of one
      micro-batch (per token and block: every linear's output, two norm inputs and the MLP
      product; with checkpointing only each block's input plus one block's set) and the
      float32 logits with their log-softmax and gradient
  ranks  one-shot stages plan one process whatever world_size says; training under DDP
      holds everything on every rank plus DDP's gradient buckets; FSDP2 (engine/shard.py)
      shards weights, gradients, moments, z and u and gathers two blocks at a time; with
      `offload=true` those shards are host memory and the device keeps the gathered blocks,
      the root group and the activations

A recovery that trains the whole model replaces a one-shot plan (its stage is the larger);
a block-wise one adds its block in training to it.

Phases: the terms of a whole-model training run do not all live at once. A term is held
`always` (weights, Adam's moments, z, u, DDP's buckets) or in one phase of a step:
`backward` (its start: the saved activations, the logits and their gradient, FSDP2's
gathered blocks and root group), `update` (the backward's end and the optimizer step: every
gradient, a projection's temporaries, FSDP2's whole root gradient, foreach Adam's
temporaries) or `end` (after training: the masks, rank 0's gather of FSDP2 shards). Each
total is the `always` terms plus the largest phase, per location. Through the backward,
gradients appear as activations are freed, so its middle holds no more than the larger
end. One-shot and block-wise stages hold every term at once (`always`).

On the CPU the device is the host: every term adds to the host total. A real run compares
the totals with the visible memory before loading and stops with one line naming the
options that would fit (`plan.enforce=false` runs anyway).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .errors import SparsebenchError
from .registry import option

GIB = 2**30
PHASES = ("always", "backward", "update", "end")  # see "Phases" above
ADAM8_BLOCK = 2048  # engine/adam8bit.py: one float32 scale (two for v) per block of 2048
FORMAT_BYTES = {"float32": 4, "bfloat16": 2, "fp8": 1}


@dataclass
class PlanSpec:
    """Config of the plan itself (top-level `plan` group)."""

    enforce: bool = True  # refuse a run whose plan does not fit the visible memory
    margin: float = option(0.05, ge=0, lt=1)  # keep this share of the visible memory free
    host_limit_gib: float | None = option(None, gt=0)  # override the visible host memory (tests)
    device_limit_gib: float | None = option(None, gt=0)  # override the visible device memory


@dataclass(frozen=True)
class Terms:
    """What one stage holds, as its method or recovery declares it (`plan_terms(device)`)."""

    kind: str  # oneshot | blockwise | train (the module's docstring says what each holds)
    stats: str = "none"  # oneshot: none | norms | hessian | gram_eig | gram_inv
    prunes: bool = True  # False: nothing is pruned (no masks, no projection)
    batch: int = 1  # windows per optimizer step (train) or per training batch (blockwise)
    grad_accum: int = 1  # train: micro-batches per step
    seqlen: int | None = None  # train: the training window; None: the model's
    z_bytes: int = 0  # ADMM z and u per pruned weight; 0: no ADMM state
    u_bytes: int = 0
    adam8: bool = False  # Adam's moments in 8 bits
    trained: str = "all"  # all | no_embeddings | linears | none (a few parameters)
    checkpointing: bool = False
    bf16: bool = False  # activations in bfloat16
    merged_copy: bool = False  # each linear's merged weight kept for the backward (adapters)
    # lighter variants the method offers a refusal: (the option to name, the fields it changes)
    lighter: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()


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


def shapes_of(model: nn.Module) -> Shapes:
    from .models import find_blocks, find_linears
    from .engine.adam8bit import state_bytes as adam8_bytes

    _, blocks = find_blocks(model)
    params = sum(p.numel() for p in model.parameters())
    emb = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight.numel()}
    if model.get_output_embeddings() is not None:
        emb[id(model.get_output_embeddings().weight)] = model.get_output_embeddings().weight.numel()
    best = max(blocks, key=lambda b: sum(p.numel() for p in b.parameters()))
    lins = find_linears(best)
    hidden = model.config.hidden_size
    # distinct inputs: linears reading the same tensor (q/k/v, gate/up) share one Hessian;
    # in a block those are the linears with the same in_features fed from the same norm
    # output, i.e. everything but o_proj and down_proj reads one of two inputs.
    distinct: dict[str, int] = {}
    group: dict[str, int] = {}
    for name, lin in lins.items():
        leaf = name.rsplit(".", 1)[-1]
        key = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
               "gate_proj": "mlp_in", "up_proj": "mlp_in"}.get(leaf, name)
        distinct[key] = lin.in_features
        group[key] = group.get(key, 0) + lin.weight.numel()
    mlp_mid = max(lin.in_features for lin in lins.values())
    return Shapes(
        params=params,
        prunable=sum(lin.weight.numel() for b in blocks for lin in find_linears(b).values()),
        blocks=len(blocks),
        hidden=hidden,
        vocab=model.config.vocab_size,
        embeddings=sum(emb.values()),
        block_params=sum(p.numel() for p in best.parameters()),
        block_linear_params=sum(lin.weight.numel() for lin in lins.values()),
        act_per_token=sum(lin.out_features for lin in lins.values()) + 2 * hidden + mlp_mid,
        hessian_elems=sum(c * c for c in distinct.values()),
        max_in=max(distinct.values()),
        group_elems=max(group.values()),
        norm_elems=sum(lin.in_features for lin in lins.values()),
        largest_linear=max(((lin.out_features, lin.in_features) for lin in lins.values()), key=lambda s: s[0] * s[1]),
        dtype_bytes=next(model.parameters()).element_size(),
        largest_param=max(p.numel() for p in model.parameters()),
        adam8_all=sum(adam8_bytes(tuple(p.shape)) for p in model.parameters()),
        adam8_linears=sum(adam8_bytes(tuple(lin.weight.shape)) for b in blocks for lin in find_linears(b).values()),
        adam8_embeddings=sum(adam8_bytes(tuple(p.shape)) for p in {id(p): p for p in
                             (model.get_input_embeddings().weight,
                              *([model.get_output_embeddings().weight] if model.get_output_embeddings() is not None else []))}.values()),
    )


@dataclass
class Knobs:
    """What the plan varies: the run's own settings, and the alternatives it suggests."""

    kind: str  # oneshot | blockwise | train
    method: str
    prunes: bool = True
    stats: str = "none"  # Terms.stats
    nsamples: int = 0
    seqlen: int = 2048
    micro_batch: int = 1
    world: int = 1
    engine: str = "single"  # single | ddp | fsdp
    offload: bool = False  # fsdp: shards, gradients, moments, z and u on the host
    inputs: str = "device"  # one-shot: a block's calibration inputs and outputs on the device or the host
    calib_batch: int = 1  # one-shot: windows per forward through a block
    z_bytes: int = 0  # 0: no ADMM state
    u_bytes: int = 0
    adam8: bool = False
    trained: str = "all"  # all | no_embeddings | linears | none (only a few parameters)
    extra_trained: int = 0  # trained = none: adapters or norms
    checkpointing: bool = False
    act_bytes: int = 4  # 2 under bf16 autocast
    merged_copy: bool = False  # adapters keep each linear's merged weight for the backward
    device: str = "cpu"
    lighter: tuple = ()  # Terms.lighter: the method's own lighter variants


@dataclass
class Plan:
    model: str
    knobs: Knobs
    terms: list[tuple[str, str, float, str]] = field(default_factory=list)  # (component, where, GiB, phase)
    eval: dict[str, Any] = field(default_factory=dict)  # eval_placement: where evaluation puts the model
    rank0: set[str] = field(default_factory=set)  # terms only rank 0 holds (the final gather)

    def add(self, name: str, where: str, nbytes: float, phase: str = "always", rank0: bool = False) -> None:
        assert phase in PHASES, phase
        if nbytes > 0:
            self.terms.append((name, where, nbytes / GIB, phase))
            if rank0:
                self.rank0.add(name)

    def total(self, where: str, rank: int = 0) -> float:
        """Peak GiB of `rank` on the host or on the device: the `always` terms plus the largest
        phase there; on the CPU every term is on the host. Rank 0 is the largest."""
        if self.knobs.device == "cpu" and where == "device":
            return 0.0
        here = [(g, ph) for n, w, g, ph in self.terms if (self.knobs.device == "cpu" or w == where)
                and (rank == 0 or n not in self.rank0)]
        phases = [sum(g for g, ph in here if ph == p) for p in PHASES[1:]]
        return sum(g for g, ph in here if ph == "always") + max(phases)

    def as_dict(self) -> dict[str, Any]:
        k = self.knobs
        return {"engine": k.engine, "offload": k.offload, "calib_inputs": k.inputs, "calib_batch": k.calib_batch, "world_size": k.world,
                "method": k.method, "seqlen": k.seqlen, "micro_batch": k.micro_batch, "device": k.device,
                "per_rank_gib": {"host": round(self.total("host"), 3), "device": round(self.total("device"), 3)},
                **({"other_ranks_gib": {w: round(self.total(w, rank=1), 3) for w in ("host", "device")}}
                   if self.rank0 and k.world > 1 else {}),
                "terms": [{"component": n, "where": w, "gib": round(g, 4), "bytes": round(g * GIB), "phase": ph}
                          for n, w, g, ph in self.terms], "eval": self.eval}

    def table(self) -> str:
        k = self.knobs
        engine = f"{k.engine} + CPU offload" if k.offload else k.engine
        head = (f"memory plan: {self.model}, {k.method}, engine {engine}, {k.world} rank(s), seqlen {k.seqlen}, "
                f"micro-batch {k.micro_batch}, device {k.device} (GiB per rank)")
        width = max(len(n) for n, *_ in self.terms) if self.terms else 10
        lines = [head, f"  {'component':<{width}}  where    GiB       held"]
        for name, where, gib, phase in self.terms:
            lines.append(f"  {name:<{width}}  {where if k.device != 'cpu' else 'host':<7} {gib:8.3f}  {phase}")
        peak = "  (always + the largest phase)" if any(ph != "always" for *_, ph in self.terms) else ""
        lines.append(f"  {'total host':<{width}}  {'':<7} {self.total('host'):8.3f}{peak}")
        if self.rank0 and k.world > 1:
            lines.append(f"  {'total host, ranks > 0':<{width}}  {'':<7} {self.total('host', rank=1):8.3f}")
        if k.device != "cpu":
            lines.append(f"  {'total device':<{width}}  {'':<7} {self.total('device'):8.3f}{peak}")
        if self.eval and k.device != "cpu":
            e = self.eval
            lines.append(f"  evaluation: {e['placement']} ({e['weights_gib']:.1f} GiB of weights, {e['gpus']} GPU(s) "
                         f"visible, {e['window_gib']:.2f} GiB kept free on each for one batch)")
        return "\n".join(lines)


def declared(part, device: torch.device, what: str) -> Terms:
    """The terms a method or recovery declares; one clear error when it declares none."""
    terms = part.plan_terms(device)
    if not isinstance(terms, Terms):
        raise SparsebenchError(f"{what} '{part.name}' declares no memory-plan terms, so its memory cannot be "
                               f"planned: give {type(part).__name__} a plan_terms(device) that returns "
                               f"plan.Terms (docs/contributing.md)")
    return terms


def knobs_of(specs, world: int) -> Knobs:
    """The plan's view of a run's specs: the declared terms, the run's sizes and launch."""
    p, r = specs.pruner, specs.recover
    t = declared(p, specs.device, "method")
    common = dict(method=p.name, prunes=t.prunes, nsamples=specs.data.nsamples if p.needs_calibration else 0,
                  seqlen=specs.model.seqlen, device=specs.device.type)
    if t.kind in ("oneshot", "blockwise"):
        if t.kind == "oneshot":
            knobs = Knobs(kind="oneshot", stats=t.stats, inputs=specs.run_inputs, calib_batch=specs.calib_batch, **common)
        else:
            knobs = Knobs(kind="blockwise", stats=t.stats, micro_batch=t.batch, z_bytes=t.z_bytes, u_bytes=t.u_bytes,
                          **common)
        if r is None:
            return knobs
        rt = declared(r, specs.device, "recovery")
        if rt.kind == "train":  # the training stage is the larger one
            return _recover_knobs(r.name, rt, knobs, world, specs)
        if rt.kind == "blockwise" and knobs.kind == "oneshot":  # its block in training beside one-shot's terms
            return replace(knobs, kind="blockwise", method=f"{p.name}+{r.name}", micro_batch=rt.batch,
                           inputs="device", calib_batch=1)
        return knobs
    # whole-model training: the engine the run resolved (run.resolve_engine), else DDP on several ranks
    engine = specs.run_engine if specs.run_engine in ("ddp", "fsdp") and world > 1 else ("ddp" if world > 1 else "single")
    if specs.offload and specs.run_engine == "fsdp":  # offload is FSDP2's, on any number of ranks
        engine = "fsdp"
    micro = t.batch // t.grad_accum // max(world, 1)
    return Knobs(kind="train", stats="none", micro_batch=max(micro, 1), world=world, engine=engine,
                 offload=engine == "fsdp" and specs.offload, z_bytes=t.z_bytes, u_bytes=t.u_bytes, adam8=t.adam8,
                 trained=t.trained, checkpointing=t.checkpointing, act_bytes=2 if t.bf16 else 4, lighter=t.lighter,
                 **{**common, "seqlen": t.seqlen or specs.model.seqlen})


def _recover_knobs(name: str, rt: Terms, base: Knobs, world: int, specs) -> Knobs:
    fsdp = specs.run_engine == "fsdp"  # sharded training over the ranks, or offloaded in one (engine/shard.py)
    micro = max(rt.batch // rt.grad_accum // (world if fsdp else 1), 1)
    return replace(base, kind="train", method=f"{base.method}+{name}", micro_batch=micro,
                   seqlen=rt.seqlen or base.seqlen, trained=rt.trained, act_bytes=2 if rt.bf16 else 4,
                   merged_copy=rt.merged_copy, engine="fsdp" if fsdp else base.engine, world=world if fsdp else 1,
                   offload=fsdp and specs.offload)


def build_plan(model_name: str, s: Shapes, k: Knobs) -> Plan:
    plan = Plan(model_name, k)
    b = s.dtype_bytes
    host, dev = "host", "device"
    rows, cols = s.largest_linear
    admm = k.kind == "train" and k.z_bytes > 0  # ADMM training: masks only from the final projection on
    if k.prunes:
        plan.add("masks (bool, on the host until the run ends)", host, s.prunable, "end" if admm else "always")
        # a projection ranks one tensor at a time: its score (float32) and a sort's values
        # (float32) and indices (int64)
        plan.add("projection of one linear: score, sorted values, indices", dev, rows * cols * (4 + 4 + 8),
                 "update" if k.kind == "train" else "always")
    if k.kind in ("oneshot", "blockwise"):
        plan.add("weights (model dtype)", host, s.params * b)
        if k.kind == "oneshot":  # engine/driver.py.s Blocks: the next block is copied while one is pruned
            plan.add("two blocks on the device (in use, the next prefetched)", dev,
                     2 * s.block_params * b if k.device != "cpu" else 0)
        else:
            plan.add("one block on the device", dev, s.block_params * b if k.device != "cpu" else 0)
        in_bytes = 4 if k.kind == "blockwise" else b
        per_forward = k.calib_batch * k.seqlen  # tokens through a block in one forward
        on = host if k.inputs == "host" else dev  # pinned host memory: one batch of windows at a time on the device
        plan.add("calibration inputs of a block", on, k.nsamples * k.seqlen * s.hidden * in_bytes)
        plan.add("calibration outputs of a block", on, k.nsamples * k.seqlen * s.hidden * in_bytes)
        if on == host and k.device != "cpu":  # the batch in use, the next one in flight, one output
            plan.add("windows on the device (in use, prefetched, output)", dev, 3 * per_forward * s.hidden * in_bytes)
        if k.stats == "norms":
            plan.add("statistics: input norms (float32)", dev, s.norm_elems * 4)
        if k.stats == "hessian":
            plan.add("statistics: Hessians (float32)", dev, s.hessian_elems * 4)
            # prepare(): damped H, its Cholesky factor, the inverse and its upper factor, of
            # the largest Hessian; prune_group(): the group's stacked float32 weights, its
            # masks and their per-linear copies (bool)
            plan.add("prune copies: 4 of the largest Hessian (float32)", dev, 4 * s.max_in * s.max_in * 4)
            plan.add("prune copies: a Hessian group's weights (float32) and masks", dev, s.group_elems * (4 + 1 + 1))
        if k.stats in ("gram_eig", "gram_inv"):  # the Gram statistic as `hessian`'s
            plan.add("statistics: Gram matrices (float32)", dev, s.hessian_elems * 4)
            side = s.max_in * s.max_in
            if k.stats == "gram_eig":  # damped copy, normalised H, eigenvectors and a (H + rho I)^-1 in float64, one float32
                plan.add("prune copies: H, eigendecomposition, inverse", dev, side * (4 + 4 + 8 + 8 + 4))
            else:  # normalised H, H + rho I, its inverse
                plan.add("prune copies: H, H + rho I, inverse", dev, side * 3 * 4)
            # one linear at a time: W, Y, B, D, D0, V and a product temporary (float32), masks
            rows, cols = s.largest_linear
            plan.add("prune copies: one linear's ADMM variables (float32) and masks", dev, rows * cols * (7 * 4 + 3))
        plan.add(f"one forward through a block ({k.calib_batch} window(s))", dev, per_forward * s.act_per_token * in_bytes)
        if k.kind == "blockwise":
            w = s.block_params * 4
            plan.add("block in training: weights, grads, Adam (float32)", dev, 4 * w)
            plan.add("block in training: z, u", dev, s.block_linear_params * (k.z_bytes + k.u_bytes))
            plan.add("block in training: saved activations", dev, k.micro_batch * k.seqlen * s.act_per_token * 4)
        return plan
    # training of the whole model
    shard = k.world if k.engine == "fsdp" else 1
    trained = {"all": s.params, "no_embeddings": s.params - s.embeddings, "linears": s.prunable,
               "none": k.extra_trained}[k.trained]
    state = host if k.offload else dev  # FSDP2 CPU offload: the shards and what is built from them
    plan.add("weights (float32 master)", state, s.params * 4 / shard)
    plan.add("gradients", state, trained * 4 / shard, "update")
    adam8 = {"all": s.adam8_all, "no_embeddings": s.adam8_all - s.adam8_embeddings, "linears": s.adam8_linears,
             "none": trained * (2 + 3 * 4 / ADAM8_BLOCK)}[k.trained]
    adam = adam8 if k.adam8 else trained * 8
    plan.add("Adam moments" + (" (8-bit)" if k.adam8 else ""), state, adam / shard)
    if k.z_bytes:
        plan.add("ADMM z", state, s.prunable * k.z_bytes / shard)
        plan.add("ADMM u", state, s.prunable * k.u_bytes / shard)
    # the optimizer step's temporaries: torch's foreach Adam (CUDA) takes sqrt(v) of every tensor
    # at once; on the host Adam goes tensor by tensor (sqrt(v) and the denominator: 8 bytes per
    # value of the largest); 8-bit Adam dequantizes one tensor's m and v to float32 and keeps
    # them with the denominator (12 bytes per value) while it re-codes v: log(v), the positive
    # mask and where()'s inputs and output (17 more), 29 bytes per value (engine/adam8bit.py)
    largest = (s.largest_param if k.trained == "all" else rows * cols) / shard
    if k.trained == "none":
        pass  # a few small tensors
    elif k.adam8:
        plan.add("8-bit Adam: one tensor's float32 working set", state, 29 * largest, "update")
    elif k.device == "cuda" and not k.offload:
        plan.add("Adam step temporaries (foreach)", dev, trained * 4 / shard, "update")
    else:
        plan.add("Adam step temporaries (one tensor)", state, 8 * largest, "update")
    if not admm and k.device == "cuda" and k.prunes and not k.offload:
        plan.add("masks on the device (re-masking)", dev, s.prunable)
    if k.engine == "ddp":
        plan.add("DDP gradient buckets", dev, trained * 4)
    if k.engine == "fsdp":
        gathered = k.act_bytes  # FSDP2 gathers in the compute dtype (bf16 under its MixedPrecisionPolicy)
        plan.add("FSDP: two gathered blocks", dev, 2 * s.block_params * gathered, "backward")
        # the root group (embeddings, lm_head, final norm) stays gathered from forward to
        # the backward's end, where its gradient is whole (float32) until the reduce-scatter
        plan.add("FSDP: root group gathered", dev, s.embeddings * gathered, "backward")
        plan.add("FSDP: root group gathered, its whole gradient", dev, s.embeddings * (gathered + 4), "update")
        # at the end rank 0 gathers the weights on the host into a plain model: on a GPU run
        # that is host memory beside the device's; on the CPU (or offloaded) it follows the
        # release of the gradients, Adam's state, z and u, so only what exceeds them raises the peak
        gather = s.params * (4 + s.dtype_bytes)
        if k.device != "cpu" and not k.offload:
            plan.add("FSDP: rank 0 gathers the trained model (host)", "host", gather, "end", rank0=True)
        else:  # Adam's state, z and u (held `always`) are freed first
            freed = (adam + s.prunable * (k.z_bytes + k.u_bytes)) / shard
            plan.add("FSDP: rank 0's final gather beyond the freed training state", host, max(0.0, gather - freed), "end",
                     rank0=True)
    tokens = k.micro_batch * k.seqlen
    if k.checkpointing:
        plan.add("activations (checkpointed: block inputs)", dev, s.blocks * tokens * s.hidden * k.act_bytes, "backward")
        plan.add("activations (one block recomputed)", dev, tokens * s.act_per_token * k.act_bytes, "backward")
    else:
        plan.add("activations saved for the backward", dev, s.blocks * tokens * s.act_per_token * k.act_bytes, "backward")
    plan.add("logits, log-softmax, their gradient (float32)", dev, 3 * tokens * s.vocab * 4, "backward")
    if k.merged_copy:
        plan.add("adapters: merged weights kept for the backward", dev, s.prunable * 4, "backward")
    return plan


def plan_run(specs, world: int = 1) -> Plan:
    from .models import meta_model

    return build_plan(specs.model.name, shapes_of(meta_model(specs.model)), knobs_of(specs, world))


def eval_placement(s: Shapes, batch: int, seqlen: int, gpus: list[float] | None, margin: float) -> dict[str, Any]:
    """Where evaluation (perplexity, zero-shot) puts the model: whole on one GPU; spread over
    the visible GPUs by accelerate's device map, a block never split; or, when they cannot
    hold it, with the remaining blocks on the host (accelerate's offload). `gpus`: GiB of
    each visible GPU; every GPU keeps room for one batch's forward through a block and the
    float32 logits with their log-softmax."""
    weights = s.params * s.dtype_bytes / GIB
    window = batch * seqlen * (s.act_per_token * s.dtype_bytes + 2 * s.vocab * 4) / GIB
    keep = 1 - margin
    if gpus is None:  # a dry run for GPUs this machine lacks: plan.device_limit_gib=<GiB> sizes them
        where = "decided on the GPU machine (no GPU visible; plan.device_limit_gib sizes one)"
    elif not gpus:
        where = "host"
    elif weights + window <= keep * gpus[0]:
        where = "one GPU"
    elif weights + window * len(gpus) <= keep * sum(gpus):
        where = "GPUs (device map)"
    else:
        where = "GPUs + host (device map, offloaded)"
    return {"placement": where, "gpus": len(gpus or []), "weights_gib": round(weights, 3), "window_gib": round(window, 3)}


# ----------------------------------------------------------------------------- the check


def visible_memory(plan_spec: PlanSpec, device: torch.device) -> tuple[float, float | None]:
    """(host GiB available, device GiB total) as this process sees them."""
    host = plan_spec.host_limit_gib
    if host is None:
        host = mem_available_gib()
    dev = plan_spec.device_limit_gib
    if dev is None and device.type == "cuda" and torch.cuda.is_available():  # a dry run may plan for a GPU it lacks
        dev = torch.cuda.get_device_properties(device).total_memory / GIB
    return host, dev


def mem_available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def alternatives(model_name: str, s: Shapes, k: Knobs) -> list[tuple[str, Knobs]]:
    """Option changes the user can make, each with the plan it would give."""
    out = []
    if k.kind == "train":
        for option_text, changes in k.lighter:  # the method's own lighter variants
            out.append((option_text, replace(k, **dict(changes), lighter=())))
        if not k.checkpointing:
            out.append(("method.grad_checkpointing=true", replace(k, checkpointing=True)))
        if k.act_bytes == 4 and k.device == "cuda":
            out.append(("method.bf16=true", replace(k, act_bytes=2)))
        if k.micro_batch > 1:
            out.append((f"method.grad_accum (micro-batch {k.micro_batch // 2})", replace(k, micro_batch=k.micro_batch // 2)))
        if not k.offload and k.device == "cuda":
            out.append(("offload=true (FSDP2 CPU offload)", replace(k, offload=True, engine="fsdp")))
        for w in (2, 4, 8, 16, 32, 64):
            if w > k.world:
                out.append((f"{w} ranks with FSDP2 (engine=fsdp)", replace(k, world=w, engine="fsdp")))
    else:
        if k.kind == "oneshot" and k.inputs == "device" and k.device == "cuda":
            out.append(("calib_inputs=host", replace(k, inputs="host")))
        if k.kind == "oneshot" and k.calib_batch > 1:
            out.append(("calib_batch=1", replace(k, calib_batch=1)))
        for n in (k.nsamples // 2, k.nsamples // 4):
            if n >= 1:
                out.append((f"data.nsamples={n}", replace(k, nsamples=n)))
        if k.seqlen > 512:
            out.append((f"model.seqlen={k.seqlen // 2}", replace(k, seqlen=k.seqlen // 2)))
    return out


def fits(plan: Plan, plan_spec: PlanSpec, device: torch.device) -> bool:
    """True if the plan fits the visible memory, less the margin."""
    host_avail, dev_avail = visible_memory(plan_spec, device)
    keep = 1 - plan_spec.margin
    return plan.total("host") <= keep * host_avail and (dev_avail is None or plan.total("device") <= keep * dev_avail)


def fit_verdict(plan: Plan, s: Shapes, plan_spec: PlanSpec, device: torch.device) -> tuple[bool, str]:
    """(fits, one line): whether the plan fits the visible (or named) memory, and if not,
    what it needs and the options that would fit."""
    host_avail, dev_avail = visible_memory(plan_spec, device)
    keep = 1 - plan_spec.margin

    def fits(p: Plan) -> bool:
        return p.total("host") <= keep * host_avail and (dev_avail is None or p.total("device") <= keep * dev_avail)

    where = f"{host_avail:.1f} GiB host" + (f", {dev_avail:.1f} GiB device" if dev_avail is not None else "")
    if device.type == "cuda" and dev_avail is None:  # planning for a GPU this machine does not have
        where += (f"; the device's {plan.total('device'):.1f} GiB are not checked: no GPU is visible, "
                  f"plan.device_limit_gib=<GiB> names one")
    if fits(plan):
        return True, f"fits: {plan.total('host'):.1f} GiB host" + (
            f", {plan.total('device'):.1f} GiB device" if dev_avail is not None else "") + \
            f" of {where} (less the {plan_spec.margin:.0%} margin)"
    need = f"{plan.total('host'):.1f} GiB of host memory ({host_avail:.1f} available)"
    if dev_avail is not None and plan.total("device") > keep * dev_avail:
        need = f"{plan.total('device'):.1f} GiB of device memory ({dev_avail:.1f} on the device)"
    alts = alternatives(plan.model, s, plan.knobs)
    ok = [name for name, knobs in alts if fits(build_plan(plan.model, s, knobs))]
    if not ok:  # no single change: the pairs that fit, smallest plan first
        pairs = {}
        for n1, k1 in alts:
            for n2, k2 in alternatives(plan.model, s, k1):
                if n2 != n1 and fits(p2 := build_plan(plan.model, s, k2)):
                    pairs.setdefault(" + ".join(sorted((n1, n2))), p2.total("device") + p2.total("host"))
        ok = sorted(pairs, key=pairs.get)[:4]
    advice = f"options that fit: {'; '.join(ok)}" if ok else \
        "no single option or pair of options fits: combine more of them, or use a larger machine"
    if not ok and dev_avail is not None:  # the host may be what stops them: name what fits the device
        dev_ok = [n for n, k in alts if build_plan(plan.model, s, k).total("device") <= keep * dev_avail]
        if dev_ok:
            advice = (f"options that fit the device but not this host's {host_avail:.1f} GiB: {'; '.join(dev_ok[:4])} "
                      f"(plan.host_limit_gib=<GiB> plans for the host you will run on)")
    return False, f"does not fit: the memory plan needs {need}; {advice}"


def check_fits(plan: Plan, s: Shapes, plan_spec: PlanSpec, device: torch.device) -> None:
    """Stop before loading when the plan does not fit, naming the options that would."""
    ok, verdict = fit_verdict(plan, s, plan_spec, device)
    if ok or not plan_spec.enforce:
        return
    raise SparsebenchError(f"{verdict.removeprefix('does not fit: ')}; plan.enforce=false runs anyway "
                           f"(sparsebench dry_run=true ... prints the plan)")
