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

from .build import build_plan, eval_placement, inference_bytes
from .fit import alternatives, check_fits, fit_verdict, fits, mem_available_gib, visible_memory
from .shapes import ADAM8_BLOCK, FORMAT_BYTES, GIB, PHASES, Shapes, shapes_of
from .terms import Knobs, Plan, PlanSpec, Terms, declared, knobs_of, recover_knobs

__all__ = [
    "ADAM8_BLOCK",
    "FORMAT_BYTES",
    "GIB",
    "PHASES",
    "Knobs",
    "Plan",
    "PlanSpec",
    "Shapes",
    "Terms",
    "alternatives",
    "build_plan",
    "check_fits",
    "declared",
    "eval_placement",
    "fit_verdict",
    "fits",
    "inference_bytes",
    "knobs_of",
    "mem_available_gib",
    "recover_knobs",
    "shapes_of",
    "visible_memory",
]
