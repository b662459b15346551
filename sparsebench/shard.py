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
"""
from __future__ import annotations

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


def gather(part: torch.Tensor, like) -> torch.Tensor:
    """The whole tensor whose rows this rank holds as `part`, laid out as `like` (a DTensor)."""
    return DTensor.from_local(part, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


def rows_of(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's rows of a tensor every rank holds whole (no communication)."""
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def row_sharded(p) -> bool:
    return is_sharded(p) and all(isinstance(pl, Shard) and pl.dim == 0 for pl in p.placements)


def sum_over_ranks(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def shard_model(model: nn.Module, bf16: bool) -> None:
    """fully_shard every decoder block, then the root (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .models import find_blocks

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    _, blocks = find_blocks(model)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights of an FSDP2 model (a collective: every rank calls it), on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
