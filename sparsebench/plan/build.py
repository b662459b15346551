"""The arithmetic: a Plan's terms from the model's Shapes and the run's Knobs (the package
docstring says what each kind holds), and where evaluation puts the model."""

from __future__ import annotations

from typing import Any

from .shapes import ADAM8_BLOCK, GIB, Shapes
from .terms import Knobs, Plan


def build_plan(model_name: str, s: Shapes, k: Knobs) -> Plan:
    plan = Plan(model_name, k)
    b = s.dtype_bytes
    host, dev = "host", "device"
    rows, cols = s.largest_linear
    admm = (
        k.kind == "train" and k.z_bytes > 0
    )  # ADMM training: masks only from the final projection on
    if k.prunes:
        plan.add(
            "masks (bool, on the host until the run ends)",
            host,
            s.prunable,
            "end" if admm else "always",
        )
        # a projection ranks one tensor at a time: its score (float32) and a sort's values
        # (float32) and indices (int64)
        plan.add(
            "projection of one linear: score, sorted values, indices",
            dev,
            rows * cols * (4 + 4 + 8),
            "update" if k.kind == "train" else "always",
        )
    if k.kind in ("oneshot", "blockwise"):
        plan.add("weights (model dtype)", host, s.params * b)
        if (
            k.kind == "oneshot"
        ):  # engine/driver.py.s Blocks: the next block is copied while one is pruned
            plan.add(
                "two blocks on the device (in use, the next prefetched)",
                dev,
                2 * s.block_params * b if k.device != "cpu" else 0,
            )
        else:
            plan.add("one block on the device", dev, s.block_params * b if k.device != "cpu" else 0)
        in_bytes = 4 if k.kind == "blockwise" else b
        per_forward = k.calib_batch * k.seqlen  # tokens through a block in one forward
        on = (
            host if k.inputs == "host" else dev
        )  # pinned host memory: one batch of windows at a time on the device
        plan.add("calibration inputs of a block", on, k.nsamples * k.seqlen * s.hidden * in_bytes)
        plan.add("calibration outputs of a block", on, k.nsamples * k.seqlen * s.hidden * in_bytes)
        if on == host and k.device != "cpu":  # the batch in use, the next one in flight, one output
            plan.add(
                "windows on the device (in use, prefetched, output)",
                dev,
                3 * per_forward * s.hidden * in_bytes,
            )
        if k.stats == "norms":
            plan.add("statistics: input norms (float32)", dev, s.norm_elems * 4)
        if k.svd_copies:  # a decomposition of one linear at a time (OATS)
            plan.add(
                f"prune copies: one linear's decomposition ({k.svd_copies} float32 copies), masks",
                dev,
                rows * cols * (k.svd_copies * 4 + 2),
            )
        if k.activation_copies:  # a block's MLP activations on every window (SparseLLM)
            plan.add(
                f"prune copies: the MLP's activations over the calibration tokens "
                f"({k.activation_copies} float32 arrays)",
                dev,
                k.nsamples * k.seqlen * max(rows, cols) * k.activation_copies * 4,
            )
        if k.grows:  # factors beside the pruned weights (OATS): the model itself grows
            plan.add("low-rank factors the pruned model gains", host, s.prunable * k.grows * b)
        if k.stats == "hessian":
            plan.add("statistics: Hessians (float32)", dev, s.hessian_elems * 4)
            # prepare(): damped H, its Cholesky factor, the inverse and its upper factor, of
            # the largest Hessian; prune_group(): the group's stacked float32 weights, its
            # masks and their per-linear copies (bool)
            plan.add(
                "prune copies: 4 of the largest Hessian (float32)", dev, 4 * s.max_in * s.max_in * 4
            )
            plan.add(
                "prune copies: a Hessian group's weights (float32) and masks",
                dev,
                s.group_elems * (4 + 1 + 1),
            )
        if k.stats in ("gram_eig", "gram_inv"):  # the Gram statistic as `hessian`'s
            plan.add("statistics: Gram matrices (float32)", dev, s.hessian_elems * 4)
            side = s.max_in * s.max_in
            if (
                k.stats == "gram_eig"
                # damped copy, normalised H, eigenvectors and a (H + rho I)^-1 in float64,
                # one float32
            ):
                plan.add(
                    "prune copies: H, eigendecomposition, inverse", dev, side * (4 + 4 + 8 + 8 + 4)
                )
            else:  # normalised H, H + rho I, its inverse
                plan.add("prune copies: H, H + rho I, inverse", dev, side * 3 * 4)
            # one linear at a time: W, Y, B, D, D0, V and a product temporary (float32), masks
            rows, cols = s.largest_linear
            plan.add(
                "prune copies: one linear's ADMM variables (float32) and masks",
                dev,
                rows * cols * (7 * 4 + 3),
            )
        if k.refine:  # the refinement's input moments, and what refining one group holds
            plan.add("statistics: a refinement's input moments (float32)", dev, s.norm_elems * 16)
            rows, cols = s.largest_linear
            plan.add(
                "refine copies: a group's dense weights; one linear's metrics, orders, masks",
                dev,
                s.group_elems * b + rows * cols * (4 * 4 + 8 * 4 + 3),
            )
        plan.add(
            f"one forward through a block ({k.calib_batch} window(s))",
            dev,
            per_forward * s.act_per_token * in_bytes,
        )
        if k.kind == "blockwise":
            w = s.block_params * 4
            plan.add("block in training: weights, grads, Adam (float32)", dev, 4 * w)
            plan.add(
                "block in training: z, u", dev, s.block_linear_params * (k.z_bytes + k.u_bytes)
            )
            plan.add(
                "block in training: saved activations",
                dev,
                k.micro_batch * k.seqlen * s.act_per_token * 4,
            )
        return plan
    # training of the whole model
    shard = k.world if k.engine == "fsdp" else 1
    trained = {
        "all": s.params,
        "no_embeddings": s.params - s.embeddings,
        "linears": s.prunable,
        "none": k.extra_trained,
    }[k.trained]
    state = host if k.offload else dev  # FSDP2 CPU offload: the shards and what is built from them
    plan.add("weights (float32 master)", state, s.params * 4 / shard)
    plan.add("gradients", state, trained * 4 / shard, "update")
    adam8 = {
        "all": s.adam8_all,
        "no_embeddings": s.adam8_all - s.adam8_embeddings,
        "linears": s.adam8_linears,
        "none": trained * (2 + 3 * 4 / ADAM8_BLOCK),
    }[k.trained]
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
        gathered = (
            k.act_bytes
        )  # FSDP2 gathers in the compute dtype (bf16 under its MixedPrecisionPolicy)
        plan.add("FSDP: two gathered blocks", dev, 2 * s.block_params * gathered, "backward")
        # the root group (embeddings, lm_head, final norm) stays gathered from forward to
        # the backward's end, where its gradient is whole (float32) until the reduce-scatter
        plan.add("FSDP: root group gathered", dev, s.embeddings * gathered, "backward")
        plan.add(
            "FSDP: root group gathered, its whole gradient",
            dev,
            s.embeddings * (gathered + 4),
            "update",
        )
        # at the end rank 0 gathers the weights on the host into a plain model: on a GPU run
        # that is host memory beside the device's; on the CPU (or offloaded) it follows the
        # release of the gradients, Adam's state, z and u, so only what exceeds them raises the peak
        gather = s.params * (4 + s.dtype_bytes)
        if k.device != "cpu" and not k.offload:
            plan.add(
                "FSDP: rank 0 gathers the trained model (host)", "host", gather, "end", rank0=True
            )
        else:  # Adam's state, z and u (held `always`) are freed first
            freed = (adam + s.prunable * (k.z_bytes + k.u_bytes)) / shard
            plan.add(
                "FSDP: rank 0's final gather beyond the freed training state",
                host,
                max(0.0, gather - freed),
                "end",
                rank0=True,
            )
    tokens = k.micro_batch * k.seqlen
    if k.checkpointing:
        plan.add(
            "activations (checkpointed: block inputs)",
            dev,
            s.blocks * tokens * s.hidden * k.act_bytes,
            "backward",
        )
        plan.add(
            "activations (one block recomputed)",
            dev,
            tokens * s.act_per_token * k.act_bytes,
            "backward",
        )
    else:
        plan.add(
            "activations saved for the backward",
            dev,
            s.blocks * tokens * s.act_per_token * k.act_bytes,
            "backward",
        )
    plan.add(
        "logits, log-softmax, their gradient (float32)", dev, 3 * tokens * s.vocab * 4, "backward"
    )
    if k.merged_copy:
        plan.add("adapters: merged weights kept for the backward", dev, s.prunable * 4, "backward")
    return plan


def eval_placement(
    s: Shapes, batch: int, seqlen: int, gpus: list[float] | None, margin: float
) -> dict[str, Any]:
    """Where evaluation (perplexity, zero-shot) puts the model: whole on one GPU; spread over
    the visible GPUs by accelerate's device map, a block never split; or, when they cannot
    hold it, with the remaining blocks on the host (accelerate's offload). `gpus`: GiB of
    each visible GPU; every GPU keeps room for one batch's forward through a block and the
    float32 logits with their log-softmax."""
    weights = s.params * s.dtype_bytes / GIB
    window = batch * seqlen * (s.act_per_token * s.dtype_bytes + 2 * s.vocab * 4) / GIB
    keep = 1 - margin
    if (
        gpus is None
    ):  # a dry run for GPUs this machine lacks: plan.device_limit_gib=<GiB> sizes them
        where = "decided on the GPU machine (no GPU visible; plan.device_limit_gib sizes one)"
    elif not gpus:
        where = "host"
    elif weights + window <= keep * gpus[0]:
        where = "one GPU"
    elif weights + window * len(gpus) <= keep * sum(gpus):
        where = "GPUs (device map)"
    else:
        where = "GPUs + host (device map, offloaded)"
    return {
        "placement": where,
        "gpus": len(gpus or []),
        "weights_gib": round(weights, 3),
        "window_gib": round(window, 3),
    }


def inference_bytes(s: Shapes, sparsity: float) -> dict[str, int]:
    """Bytes one decoded token reads (every weight once) with the pruned weights in each form
    (formats.py): dense in the model's dtype; bitmask (kept values + 1 bit per weight); CSR
    with 16-bit column indices and 32-bit row pointers (evaluation/speed.py's csr16). The
    weights that are not pruned stay dense in every form."""
    b = s.dtype_bytes
    rest = (s.params - s.prunable) * b
    kept = round(s.prunable * (1 - sparsity))
    return {
        "dense_form": s.params * b,
        "bitmask": rest + kept * b + s.prunable // 8,
        "csr_int16": rest + kept * (b + 2) + (s.prunable_rows + s.blocks) * 4,
    }
