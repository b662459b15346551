"""Training checkpoints for the whole-model training methods (Elsa, Elsa-L), written with
torch.distributed.checkpoint (DCP): every `checkpoint_every` steps, each rank writes its own
shards (weights, optimizer state, ADMM z and u) in parallel into <run folder>/checkpoint;
rank 0 then writes meta.json (step, counters, the window sampler's state, the history),
last, so a checkpoint without meta.json is incomplete and ignored.

A run that stops (preempted, killed, a node lost) and is started again with the same
command resumes from the last checkpoint: the same fingerprint (the run's config and data,
sparsebench/records/ledger.py), world size and engine are required; anything else starts from step
0 with a warning (the stale checkpoint is removed). The folder is removed when the
training ends. Keys carry the rank (`r<rank>/...`): a resume needs the world size it was
written with, which a rescheduled job keeps.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .shard import local

log = logging.getLogger(__name__)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _sampler_state(sampler) -> Any:
    if hasattr(sampler, "rng"):  # WindowSampler: a random.Random
        return {"kind": "random", "state": sampler.rng.getstate()}
    return {"kind": "torch", "state": sampler.gen.get_state().tolist()}


def _set_sampler_state(sampler, state: dict) -> None:
    if state["kind"] == "random":
        version, internal, gauss = state["state"]
        sampler.rng.setstate((version, tuple(internal), gauss))
    else:
        sampler.gen.set_state(torch.tensor(state["state"], dtype=torch.uint8))


class TrainingCheckpoint:
    def __init__(self, folder: Path | None, every: int, fingerprint: str | None, engine: str):
        self.folder, self.every, self.fingerprint, self.engine = folder, every, fingerprint, engine
        self.rank, self.world = _rank_world()

    @property
    def enabled(self) -> bool:
        return self.every > 0 and self.folder is not None

    def due(self, step: int, total: int) -> bool:
        """Save after `step` (0-based)? Not after the last one: the run ends there."""
        return self.enabled and (step + 1) % self.every == 0 and step + 1 < total

    # ------------------------------------------------------------------ tensors

    def _tensors(self, params: dict[str, torch.Tensor], optimizer, admm) -> dict[str, torch.Tensor]:
        """This rank's tensors, by key; loading fills these very tensors in place."""
        out: dict[str, torch.Tensor] = {}
        for i, p in enumerate(params.values()):
            out[f"param/{i}"] = local(p.data)
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out[f"optim/{i}/{k}"] = local(v)
        for name in admm.params:
            for what, stored in (("z", admm.z[name]), ("u", admm.u[name])):
                out[f"admm/{name}/{what}"] = stored.data
                if stored.scale is not None:
                    out[f"admm/{name}/{what}_scale"] = stored.scale
        return {f"r{self.rank}/{k}": v for k, v in out.items()}

    @staticmethod
    def _prime_optimizer(params: dict[str, torch.Tensor], optimizer) -> None:
        """Create the optimizer's state (zeros) so a checkpoint can be loaded into it."""
        for p in params.values():
            if p.requires_grad and not optimizer.state.get(p):
                p.grad = torch.zeros_like(p)
        lrs = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        saved = {n: local(p.data).clone() for n, p in params.items()}
        optimizer.step()  # lr 0: state allocated, weights unchanged (restored below anyway)
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        for n, p in params.items():
            local(p.data).copy_(saved[n])
            p.grad = None

    @staticmethod
    def _int_steps(params, optimizer) -> dict[str, int]:
        """Step counters kept as Python ints (8-bit Adam); torch's Adam keeps a tensor (saved
        above)."""
        steps = {}
        for i, p in enumerate(params.values()):
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, int):
                steps[str(i)] = step
        return steps

    # ------------------------------------------------------------------ save / load

    def save(self, step: int, params, optimizer, admm, trainer, sampler, history: list) -> None:
        path = self.folder / "checkpoint"
        if self.rank == 0 and (path / "meta.json").exists():
            (path / "meta.json").unlink()  # the old checkpoint is incomplete from now on
        _barrier()
        with warnings.catch_warnings():  # one process: DCP says it saves without a process group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(self._tensors(params, optimizer, admm), checkpoint_id=str(path))
        _barrier()
        if self.rank == 0:
            meta = {
                "step": step + 1,
                "fingerprint": self.fingerprint,
                "world": self.world,
                "engine": self.engine,
                "optimizer_steps": self._int_steps(params, optimizer),
                "trainer": {
                    "steps_done": trainer.steps_done,
                    "tokens": trainer.tokens,
                    "wall_s": trainer.wall_s,
                },
                "admm": {
                    "updates": admm.updates,
                    "lam_at_update": admm.lam_at_update,
                    "churn": admm.churn,
                },
                "sampler": _sampler_state(sampler),
                "history": history,
            }
            tmp = path / "meta.json.tmp"
            tmp.write_text(json.dumps(meta))
            tmp.replace(path / "meta.json")
        _barrier()
        log.info("checkpoint after step %d: %s", step + 1, path)

    def load(self, params, optimizer, admm, trainer, sampler, history: list) -> int:
        """Restore the last checkpoint if it is this run's; returns the step to start from."""
        if not self.enabled:
            return 0
        path = self.folder / "checkpoint"
        meta_file = path / "meta.json"
        if not meta_file.exists():
            return 0
        meta = json.loads(meta_file.read_text())
        mine = {"fingerprint": self.fingerprint, "world": self.world, "engine": self.engine}
        differ = [f"{k}: {meta.get(k)} -> {v}" for k, v in mine.items() if meta.get(k) != v]
        if differ:
            log.warning(
                "checkpoint %s is not this run's (%s): starting from step 0",
                path,
                "; ".join(differ),
            )
            _barrier()
            if self.rank == 0:
                shutil.rmtree(path, ignore_errors=True)
            _barrier()
            return 0
        self._prime_optimizer(params, optimizer)
        tensors = self._tensors(params, optimizer, admm)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, checkpoint_id=str(path))
        for i, p in enumerate(params.values()):
            step = meta["optimizer_steps"].get(str(i))
            if step is not None:
                optimizer.state[p]["step"] = step
        t = meta["trainer"]
        trainer.steps_done, trainer.tokens, trainer.wall_s = (
            t["steps_done"],
            t["tokens"],
            t["wall_s"],
        )
        a = meta["admm"]
        admm.updates, admm.lam_at_update, admm.churn = a["updates"], a["lam_at_update"], a["churn"]
        _set_sampler_state(sampler, meta["sampler"])
        history[:] = meta["history"]
        log.info("resuming from the checkpoint after step %d (%s)", meta["step"], path)
        return int(meta["step"])

    def remove(self) -> None:
        if not self.enabled:
            return
        _barrier()
        if self.rank == 0:
            shutil.rmtree(self.folder / "checkpoint", ignore_errors=True)
        _barrier()
