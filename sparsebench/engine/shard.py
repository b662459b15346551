"""FSDP2 (torch.distributed.fsdp.fully_shard) for the training methods: the one place that
knows parameters may be DTensors sharded by rows across ranks.

Under `engine=fsdp` every decoder block and then the whole model are wrapped with
fully_shard: each rank holds 1/world of every parameter's rows (Shard(0)), of its gradient
and of everything built from it locally (Adam's moments, ADMM's z and u). The ADMM engine
works on the local shards (`local`); what needs the whole tensor goes through here:
- a per-tensor projection (one threshold over the tensor) gathers the score (`gather`),
  projects it with the same code a single process runs (same ties, by flat index) and
  keeps this rank's rows (`rows_of`), so the masks equal the single-process masks;
  per-row and N:M projections are local to a row shard and run on the shard itself;
- sums for logging (distance, churn) are all-reduced (`sum_over_ranks`).
Mixed precision: bf16 compute where the method uses bf16 (CUDA), fp32 master weights
and fp32 gradient reduction.

CPU offload (`offload=true`, FSDP2's CPUOffloadPolicy): the sharded fp32 weights, their
gradients and so the optimizer state, z and u live in host memory; FSDP2 copies each
block's weights to the GPU for its forward and backward and the optimizer step runs on
the host. The process group then has a gloo backend beside NCCL (`backend`) for the
collectives on host tensors (gradient clipping, FP8 scales, sums); `gather` returns on
the GPU (a per-tensor projection sorts there) and `rows_of` brings this rank's rows back
to the device of its shard.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment]

ENGINES = ("auto", "single", "ddp", "fsdp")


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of t (t itself when it is not sharded); in-place edits reach t."""
    return t.to_local() if is_sharded(t) else t


def backend(device: torch.device, offload: bool) -> str:
    """The process group's backend: NCCL for GPU tensors, and gloo beside it for the host
    tensors an offloaded run reduces (torch's clip_grad_norm_ included)."""
    if device.type != "cuda":
        return "gloo"
    return "cpu:gloo,cuda:nccl" if offload else "nccl"


def gather(part: torch.Tensor, like) -> torch.Tensor:
    """The whole tensor whose rows this rank holds as `part`, laid out as `like` (a DTensor),
    on the mesh's device: an offloaded shard is on the host, but the gathered score of a
    per-tensor projection is sorted on the GPU (rows_of brings this rank's rows back)."""
    mesh = like.device_mesh
    return DTensor.from_local(
        part.to(mesh.device_type), mesh, like.placements, shape=like.shape, stride=like.stride()
    ).full_tensor()


def rows_of(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's rows of a tensor every rank holds whole (no communication), on the device
    of this rank's shard of `like`."""
    rows = distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return rows.to(like.to_local().device)


def row_sharded(p) -> bool:
    return is_sharded(p) and all(isinstance(pl, Shard) and pl.dim == 0 for pl in p.placements)


def sum_over_ranks(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def share_pruned(
    model: nn.Module, masks: dict[str, torch.Tensor] | None, run_id: str
) -> dict[str, torch.Tensor]:
    """Rank 0's pruned weights and masks to every rank (a collective), before a sharded
    recovery. The other ranks first wait on the store for rank 0's key of this run (its
    fingerprint), not in a collective: one-shot pruning of a large model takes longer than
    a collective's timeout. Returns the masks."""
    from datetime import timedelta

    from ..models import prunable_linears

    rank = dist.get_rank()
    store = dist.distributed_c10d._get_default_store()
    key = f"sparsebench/pruned/{run_id}"
    if rank == 0:
        store.set(key, "1")
    else:
        store.wait([key], timedelta(days=2))
    comm = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() != "gloo"
        else torch.device("cpu")
    )
    for t in [*model.parameters(), *model.buffers()]:
        buf = t.data.to(comm)
        dist.broadcast(buf, src=0)
        t.data.copy_(buf)
    out = {}
    for name, lin in sorted(prunable_linears(model).items()):
        buf = (masks[name] if rank == 0 else torch.empty(lin.weight.shape, dtype=torch.bool)).to(
            comm, torch.uint8
        )
        dist.broadcast(buf, src=0)  # gloo broadcasts no bool
        out[name] = buf.bool().cpu()
    return out


def shard_model(model: nn.Module, bf16: bool, offload: bool = False) -> None:
    """fully_shard every decoder block, then the root (embeddings, final norm, lm_head);
    with `offload` the shards stay in (pinned, on a GPU machine) host memory."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    from ..models import find_blocks

    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
    )
    where = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    _, blocks = find_blocks(model)
    for block in blocks:
        fully_shard(block, mp_policy=policy, offload_policy=where)
    fully_shard(model, mp_policy=policy, offload_policy=where)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights of an FSDP2 model (a collective: every rank calls it), on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def place_for_training(
    model: nn.Module, device: torch.device, sharded: bool, offload: bool, bf16: bool
) -> None:
    """Shard (FSDP2) before the move, so no rank holds the whole model on the device; an
    offloaded model stays on the host (FSDP2 moved its buffers)."""
    if sharded:
        shard_model(model, bf16=bf16, offload=offload)
    if not (sharded and offload):
        model.to(device)


def unshard(model: nn.Module, fresh: Callable[[], nn.Module]) -> nn.Module | None:
    """The trained weights gathered into a plain copy from `fresh()` on rank 0 (a collective:
    every rank calls it); None on the other ranks."""
    state = full_state_dict(model)
    if dist.get_rank() != 0:
        return None
    plain = fresh()
    plain.load_state_dict(state)
    return plain
