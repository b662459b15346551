"""What runs, resolved from what was asked (specs.Specs) by the memory plan: the engine
(single, DDP or FSDP2), where a one-shot method's calibration inputs live (device or pinned
host memory) and the ranks; the process group under torchrun; the dry run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch

from .engine.shard import backend
from .errors import SparsebenchError
from .families import map_lines, model_map
from .plan import (
    build_plan,
    eval_placement,
    fit_verdict,
    fits,
    inference_bytes,
    knobs_of,
    shapes_of,
)
from .registry import METHODS
from .specs import Specs


@dataclass
class Launch:
    """The resolved launch of a run (memory_plan decides it; the run only reads it)."""

    engine: str = "single"  # single | ddp | fsdp (engine/shard.py)
    inputs: str = (
        "device"  # one-shot methods: a block's calibration inputs on the device or the host
    )
    world: int = 1  # ranks
    offload: bool = False  # FSDP2 CPU offload, as asked
    calib_batch: int = 1  # one-shot methods: windows per forward through a block, as asked


_own_group = False  # a one-process group init_distributed made (offload): ended with its run


def end_own_group() -> None:
    import torch.distributed as dist

    global _own_group
    if _own_group and dist.is_initialized():
        dist.destroy_process_group()
    _own_group = False


def init_distributed(specs: Specs, launch: Launch) -> int:
    """Under torchrun (WORLD_SIZE > 1): join the process group; in one process FSDP2
    (offload=true) gets a group of one. Every rank takes rank 0's engine. Returns this rank."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        if (
            launch.engine == "fsdp" and not dist.is_initialized()
        ):  # offload on one process: a group of one
            dist.init_process_group(
                backend(specs.device, specs.offload), store=dist.HashStore(), rank=0, world_size=1
            )
            global _own_group
            _own_group = True
        return 0
    if (
        not specs.pruner.distributed and launch.engine != "fsdp"
    ):  # fsdp: a sharded recovery after it
        raise SparsebenchError(
            f"method '{specs.pruner.name}' runs in one process; launch it without torchrun "
            "(multi-process methods: "
            f"{', '.join(n for n in METHODS.names() if METHODS.get(n).distributed)})"
        )
    if not dist.is_initialized():
        dist.init_process_group(backend(specs.device, specs.offload))
    if specs.device.type == "cuda":
        torch.cuda.set_device(specs.device)
    choice = [
        launch.engine
    ]  # engine=auto read each rank's free memory: rank 0's choice holds for all
    dist.broadcast_object_list(choice, src=0)
    launch.engine = choice[0]
    return dist.get_rank()


def asked_launch(specs: Specs, world: int, engine: str = "single") -> Launch:
    return Launch(
        engine=engine,
        inputs="device" if specs.calib_inputs == "auto" else specs.calib_inputs,
        world=world,
        offload=specs.offload,
        calib_batch=specs.calib_batch,
    )


def memory_plan(specs: Specs, world: int):
    """(plan, shapes, launch) for this run from the model's meta-device shapes (plan/): the
    launch (engine, inputs placement) is resolved on the way, the specs are not touched."""
    from .models import check_block_coverage, meta_model

    meta = meta_model(specs.model)  # cached per model spec, and so is what is read from it here
    if not hasattr(meta, "sparsebench_read"):
        check_block_coverage(meta)  # nothing of a block silently left dense (MoE experts, routers)
        meta.sparsebench_read = (shapes_of(meta), model_map(meta))
    shapes, mapped = meta.sparsebench_read
    cut = cut_plan(specs, meta) if specs.pruner.structured else None
    check = getattr(specs.pruner, "check_model", None)
    if check is not None:  # a method that covers only some families (SparseLLM's MLPs)
        check(meta)
    if specs.quant is not None:  # a group size that splits a linear's width: refused now
        from .models import prunable_linears

        specs.quant.check_widths({n: m.in_features for n, m in prunable_linears(meta).items()})
    if specs.save.enabled and specs.save.format == "quantized":
        from .families import relaid

        fused = relaid(meta)
        if fused:
            raise SparsebenchError(
                f"save.format=quantized writes the model's own linears, and "
                f"{specs.model.name} stores {fused[0]} (and {len(fused) - 1} more) fused or "
                "transposed; use save.format=dense or bitmask"
            )
    launch = asked_launch(specs, world, resolve_engine(specs, world, shapes))
    plan = build_plan(specs.model.name, shapes, knobs_of(specs, launch))
    if (
        specs.calib_inputs == "auto"
        and plan.knobs.kind == "oneshot"
        and not fits(plan, specs.plan, specs.device)
    ):
        host = build_plan(specs.model.name, shapes, replace(plan.knobs, inputs="host"))
        if fits(
            host, specs.plan, specs.device
        ):  # the inputs do not fit the GPU beside the block: keep them on the host
            launch.inputs, plan = "host", host
    plan.model_map = mapped
    plan.inference = inference_bytes(shapes, 0.0 if cut else specs.sparsity)
    if cut:  # the smaller dense model after the cut (blocks of equal size: the mean block)
        plan.inference["cut"] = cut
        plan.inference["after_cut"] = (shapes.params - cut["params"]) * shapes.dtype_bytes
    plan.eval = eval_placement(
        shapes, specs.eval.batch_size, specs.model.seqlen, visible_gpus(specs), specs.plan.margin
    )
    if specs.schedule.allocation == "evopress":
        evopress_terms(plan, shapes, specs)
    return plan, shapes, launch


def evopress_terms(plan, shapes, specs: Specs) -> None:
    """EvoPress's search holds the dense model's logits of its windows (float32) beside the
    model; its level database lives on disk: about 2L + 1 levels of every pruned linear as
    bitmask + kept values (evopress.py), in the plan's `disk_bytes`."""
    from .sparsity import EvoPressSearch

    evo = specs.schedule.evopress or EvoPressSearch()
    windows = min(evo.kl_windows or specs.data.nsamples, specs.data.nsamples)
    logits = windows * specs.model.seqlen * shapes.vocab * 4
    plan.add("evopress: the dense logits of the search's windows (float32)", "host", logits)
    plan.add("evopress: one candidate's logits (float32, and log-softmax)", "host",
             3 * specs.model.seqlen * shapes.vocab * 4)  # fmt: skip
    kept = 1 - specs.sparsity
    plan.disk["evopress database"] = int(
        (2 * evo.num_levels + 1) * shapes.prunable * (1 / 8 + kept * shapes.dtype_bytes)
    )


def cut_plan(specs: Specs, meta) -> dict[str, Any]:
    """A structured method's cut, checked on the model's shapes before any work (a share that
    removes no block or every block; a family whose blocks a width cut cannot narrow) and
    sized: about how many weights go."""
    from .cut import blocks_for_share
    from .cut.widths import parts_of
    from .models import find_blocks
    from .pruners.reap import experts_to_drop

    blocks = find_blocks(meta)[1]
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    if specs.pruner.structured == "blocks":
        n = blocks_for_share(specs.sparsity, len(sizes))
        what = f"{n} of {len(sizes)} decoder blocks"
        return {"what": what, "params": round(n * sum(sizes) / len(sizes))}
    if specs.pruner.structured == "experts":
        n, count, params = experts_to_drop(meta, specs.sparsity)
        return {"what": f"{n} of {count} experts per MoE layer", "params": params}
    for block in blocks:
        parts_of(block, meta.config)
    what = "attention groups and MLP channels"
    return {"what": what, "params": round(specs.sparsity * sum(sizes))}


def visible_gpus(specs: Specs) -> list[float] | None:
    """GiB of each GPU evaluation may use: the visible ones (plan.device_limit_gib overrides
    their size); [] on the CPU; None when a dry run plans for GPUs it cannot see."""
    if specs.device.type != "cuda":
        return []
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if specs.plan.device_limit_gib is not None:
        return [specs.plan.device_limit_gib] * max(count, 1)
    return [torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(count)] or None


def resolve_engine(specs: Specs, world: int, shapes=None) -> str:
    """single | ddp | fsdp for this run. auto: one process -> single; several -> DDP when
    its per-rank plan (every rank holds all the state) fits the visible memory, else FSDP2."""
    engine, name = specs.engine, specs.pruner.name  # build_specs checked it against ENGINES
    if (
        not specs.pruner.distributed
        and getattr(specs.recover, "shardable", False)
        and (specs.offload or world > 1)
    ):
        # a one-shot method on rank 0, then masked fine-tuning sharded with FSDP2 over the
        # ranks (or, with offload=true, in this one process)
        if engine in ("single", "ddp"):
            raise SparsebenchError(
                f"recover={specs.recover.name} on several ranks or with offload=true runs on "
                f"FSDP2, but engine={engine}; use engine=fsdp or auto"
            )
        return "fsdp"
    if not specs.pruner.distributed:
        if engine in ("ddp", "fsdp") or specs.offload:
            what = f"engine={engine}" if engine in ("ddp", "fsdp") else "offload=true"
            raise SparsebenchError(
                f"{what} is for whole-model training (elsa, elsa_l; offload=true also for "
                f"recover=finetune); method '{name}' runs in one process (valid for it: "
                "engine=auto "
                f"or single, offload=false)"
            )
        return "single"
    if specs.offload:  # CPU offload is FSDP2's: one process runs it as a group of one
        if engine in ("single", "ddp"):
            raise SparsebenchError(
                f"offload=true is FSDP2's CPU offload, but engine={engine}; use engine=fsdp or auto"
            )
        return "fsdp"
    if world == 1:
        if engine in ("ddp", "fsdp"):
            raise SparsebenchError(
                f"engine={engine} needs several processes: launch with torchrun --nproc_per_node=N "
                f"(sparsebench dry_run=true world_size=N engine={engine} ... plans it); "
                f"on one GPU, FSDP2 runs with offload=true"
            )
        return "single"
    if engine == "single":
        raise SparsebenchError(
            f"engine=single but {world} processes were launched; valid with torchrun: auto, ddp, "
            "fsdp"
        )
    if engine == "auto":
        ddp = (
            build_plan(specs.model.name, shapes, knobs_of(specs, asked_launch(specs, world, "ddp")))
            if shapes is not None
            else None
        )
        engine = "ddp" if ddp is None or fits(ddp, specs.plan, specs.device) else "fsdp"
    return engine


def dry_run(specs: Specs) -> dict[str, Any]:
    """Print the plan and its verdict and return them; nothing is loaded, claimed or written
    (the model's config alone gives the shapes: a hub model's from the architecture its config
    file carries, model.arch, so a plan never waits on the network)."""
    if specs.model.source == "hub" and specs.model.arch:
        specs = replace(specs, model=replace(specs.model, source="random"))
        print(
            f"planned from the architecture in {specs.model.name}'s config (model.arch), "
            "not from the hub: nothing is downloaded"
        )
    plan, shapes, _ = memory_plan(specs, specs.world_size)
    if specs.world_size > 1 and plan.knobs.kind != "train":
        print(
            f"{specs.pruner.name} runs in one process: planned for 1 rank "
            f"(world_size={specs.world_size} ignored)"
        )
    print("\n".join(map_lines(plan.model_map)))
    inf = plan.inference
    if "cut" in inf:
        c = inf["cut"]
        print(
            f"cut: {specs.pruner.name} removes {c['what']} (about {c['params']:,} weights); one "
            "decoded token then reads "
            f"{inf['after_cut'] / 2**30:.2f} GiB against {inf['dense_form'] / 2**30:.2f} GiB "
            "dense (a plain dense model)"
        )
    else:
        print(
            f"inference: one decoded token reads {inf['dense_form'] / 2**30:.2f} GiB dense, "
            f"{inf['bitmask'] / 2**30:.2f} GiB with the pruned weights as bitmask + values, "
            f"{inf['csr_int16'] / 2**30:.2f} GiB as 16-bit-index CSR (docs/speed.md)"
        )
    print(plan.table())
    for what, nbytes in plan.disk.items():
        print(f"disk: {what} about {nbytes / 2**30:.2f} GiB (written once, reused by later runs)")
    ok, verdict = fit_verdict(plan, shapes, specs.plan, specs.device)
    print(f"verdict: {verdict}")
    return {"plan": plan.as_dict(), "metrics": {}, "fits": ok, "verdict": verdict}


def slurm_ranks() -> None:
    """Under SLURM with several tasks (hydra/launcher=slurm, tasks_per_node > 1) and no torchrun:
    set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from SLURM's variables (submitit's
    helper)."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        raise SparsebenchError(
            "several SLURM tasks but no torchrun: install hydra-submitit-launcher "
            "(make install-slurm) or launch with torchrun"
        ) from None
    TorchDistributedEnvironment().export()
