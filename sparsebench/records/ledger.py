"""What a run folder holds and who may write it: fingerprints, protocol ids, claims.

A run's fingerprint is everything that moves one of its numbers: the resolved config
minus the keys that only log, launch or save (`NOT_RESULTS`), with the local data root
replaced by a digest of every data file the run reads. Resume compares fingerprints, so a
folder is skipped only when it already holds this very run, and a folder holding a
complete result of another config is never overwritten.

The protocol id is the fingerprint of the dense model under the same evaluation: the
keys that only pruning reads (method, sparsity, pattern, schedule, calibration draw, and
the seed of a real model) are left out, so a sweep gets one dense baseline per protocol
and the report divides by the matching one.

Claims: a run folder is written by one process at a time. `claim()` creates
`.sparsebench.lock` (pid, host, start time) atomically; a second process is told who
holds it; a lock whose process is gone (same host) is taken over with a warning.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import SparsebenchError

log = logging.getLogger(__name__)

# Top-level keys that change no number: wandb, the resume/baseline switches, exports.
NOT_RESULTS = (
    "logger",
    "resume",
    "dense_baseline",
    "save",
    "hydra",
    "dry_run",
    "world_size",
    "plan",
    "engine",
    "offload",
    "calib_inputs",
    "checkpoint_every",
)
# Data keys that only the calibration draw reads.
CALIBRATION_KEYS = ("nsamples", "seed", "calib_set", "calib_docs")
# Keys that only pruning reads: the dense model's numbers never depend on them.
PRUNING_KEYS = ("method", "sparsity", "pattern", "schedule", "recover", "refine")
LOCK = ".sparsebench.lock"


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def identity(
    config: dict[str, Any], *, needs_calibration: bool = True, dense: bool = False
) -> dict[str, Any]:
    """The part of a resolved config that moves a number of this run."""
    c = copy.deepcopy({k: v for k, v in config.items() if k not in NOT_RESULTS})
    c.pop("protocol", None)  # a label: its values are in data and eval
    for key in ("refine", "quant"):  # none: identities from before the key stay
        if (c.get(key) or {}).get("name", "none") == "none":
            c.pop(key, None)
    if c.get("calib_batch", 1) == 1:
        c.pop(
            "calib_batch", None
        )  # the official code's one window per forward: identities from before the key stay
    data = c.get("data") or {}
    data.pop("cache", None)
    if data.get("source") == "local":
        data.pop("root", None)  # where the files are does not matter; their digests do
    if not needs_calibration or dense:
        for key in CALIBRATION_KEYS:
            data.pop(key, None)
    if dense:
        for key in PRUNING_KEYS:
            c.pop(key, None)
        if (c.get("model") or {}).get("source") not in ("tiny", "random"):
            c.pop("seed", None)  # the seed initialises only random models
    return c


def fingerprint(
    config: dict[str, Any], data_files: dict[str, str], *, needs_calibration: bool, dense: bool
) -> dict[str, Any]:
    """{digest, config, data}: the digest covers only what moves this run's numbers; `config`
    keeps every result key, so that a mismatch can be told as the keys that differ."""
    ident = identity(config, needs_calibration=needs_calibration, dense=dense)
    return {
        "digest": digest({"config": ident, "data": data_files}),
        "config": identity(config),
        "data": data_files,
    }


def protocol_id(config: dict[str, Any], eval_files: dict[str, str]) -> str:
    """The dense model's fingerprint under this run's evaluation (what "% of dense" divides by).
    The speed measurement's settings move no perplexity: runs with and without it share the
    dense run of their protocol."""
    config = copy.deepcopy(config)
    (config.get("eval") or {}).pop("speed", None)
    config.pop("quant", None)  # the protocol's dense model is the unquantized one
    return fingerprint(config, eval_files, needs_calibration=False, dense=True)["digest"]


def job_id(config: dict[str, Any]) -> str:
    """A short id of a job's config for its sweep folder name: a job is its config, not
    Hydra's job number, so extending a sweep finds the folders of the jobs already run."""
    return digest(identity(config))[:8]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every key whose value differs between two fingerprints."""
    a = flatten({"config": old.get("config", {}), "data": old.get("data", {})})
    b = flatten({"config": new.get("config", {}), "data": new.get("data", {})})
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            name = (
                key.removeprefix("config.").replace("data.", "data file ", 1)
                if key.startswith("data.")
                else key.removeprefix("config.")
            )
            out.append(f"{name}: {a.get(key, '<unset>')} -> {b.get(key, '<unset>')}")
    return out


# ----------------------------------------------------------------------------- results on disk


def previous_results(out_dir: Path, move_aside: bool = True) -> dict[str, Any] | None:
    """The results.json already in a run folder, if any. One that cannot be read (cut off,
    hand-edited into invalid JSON) is moved aside (by the folder's claimant only), never
    silently overwritten."""
    path = Path(out_dir) / "results.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as err:
        if not move_aside:
            return None
        aside = path.with_name(f"results.unreadable-{time.strftime('%Y%m%d-%H%M%S')}.json")
        path.replace(aside)
        log.warning(
            "%s could not be read (%s); moved to %s and the run starts afresh",
            path,
            err,
            aside.name,
        )
        return None


def stored_fingerprint(results: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint a results.json was written with (older files: from their config)."""
    fp = results.get("fingerprint")
    if isinstance(fp, dict) and "digest" in fp:
        return fp
    return {"digest": None, "config": identity(results.get("config") or {}), "data": {}}


# ----------------------------------------------------------------------------- folders


def check_writable(folder: Path, what: str, hint: str) -> None:
    """Create the folder (and its parents) and write a probe file in it, now, before any
    expensive work; one clear error if that fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise SparsebenchError(
            f"{what} {folder} is not writable ({err.strerror or err}); {hint}"
        ) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderBusy(SparsebenchError):
    """Another process holds the run folder."""


@contextmanager
def claim(out_dir: Path):
    """Hold `out_dir` for this process for the duration of the block (see module doc)."""
    path = Path(out_dir) / LOCK
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if host == me["host"] and isinstance(pid, int) and not _alive(pid):
                log.warning(
                    "%s: taking over the lock of pid %s, which is no longer running", out_dir, pid
                )
                path.unlink(missing_ok=True)
                continue
            if (
                not holder and time.time() - path.stat().st_mtime > 60
            ):  # an empty lock left by a crash mid-write
                path.unlink(missing_ok=True)
                continue
            raise FolderBusy(
                f"{out_dir} is being run by pid {pid} on {host} since {holder.get('since')}; "
                f"wait for it, or remove {path} if that process is gone"
            )
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise FolderBusy(f"could not claim {out_dir}: its lock keeps changing hands")
    try:
        yield
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
        except (OSError, ValueError):
            pass


def _job_resolver(*, _root_) -> str:
    """${sb_job:} in hydra.sweep.subdir: the job's config id (the hydra node left out)."""
    from omegaconf import OmegaConf

    job = OmegaConf.masked_copy(_root_, [k for k in _root_ if k != "hydra"])
    return job_id(OmegaConf.to_container(job, resolve=True))


def legacy_job_folder(out_dir: Path) -> Path | None:
    """The folder an earlier version gave this sweep job (N:M patterns were written `2:4`,
    now `2-4`), if it exists: a resumed sweep finds the jobs it finished there."""
    old = out_dir.with_name(re.sub(r"_(\d+)-(\d+)_", r"_\1:\2_", out_dir.name))
    return old if old != out_dir and (old / "results.json").exists() else None


def saved_setting(path: Any, key: str, default: Any = None) -> Any:
    """${sb_saved:<export folder>,<key>,<default>} (conf/model/local.yaml,
    conf/protocol/saved.yaml):
    what a sparsebench export recorded of the run that wrote it (dtype, seqlen, evaluation
    protocol), so `model=local model.path=<export> method=dense` evaluates it as that run did;
    any explicit override on the command line replaces the interpolation and wins. A folder
    that is not an export, or an older export without the key, gives the default (the dtype
    from its config.json)."""
    folder = Path(str(path))
    try:
        meta = json.loads((folder / "sparsebench.json").read_text())
    except (OSError, ValueError):
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    if key == "dtype" and "dtype" not in meta:
        try:
            cfg = json.loads((folder / "config.json").read_text())
            found = cfg.get("dtype") or cfg.get("torch_dtype")
            return found if found in ("float32", "float16", "bfloat16") else default
        except (OSError, ValueError, AttributeError):
            return default
    if key == "seqlen":
        return (meta.get("data") or {}).get("seqlen", default)
    if key == "dtype":
        return meta["dtype"]
    value = meta.get("evaluation", {})
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    return value


def _register_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("sb_job"):
        OmegaConf.register_new_resolver("sb_job", _job_resolver)
    if not OmegaConf.has_resolver(
        "sb_safe"
    ):  # folder names safe in every shell and filesystem: 2:4 -> 2-4
        OmegaConf.register_new_resolver("sb_safe", lambda value: str(value).replace(":", "-"))
    if not OmegaConf.has_resolver("sb_saved"):
        OmegaConf.register_new_resolver("sb_saved", saved_setting)


_register_resolver()


def record_refused(out: Path, error: str, cfg, overrides: list[str]) -> None:
    """A sweep job refused before any work: its folder gets a results.json saying so (status
    "refused", the error, the job's overrides and config), so that the report lists it beside
    the jobs that ran; running the sweep again runs it again, as any job that did not
    complete."""
    from omegaconf import OmegaConf

    from .tracking import write_json

    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # the refusal may be that it cannot be resolved
        config = OmegaConf.to_container(cfg, resolve=False)
    config.pop("hydra", None)
    write_json(
        Path(out) / "results.json",
        {"status": "refused", "error": error, "overrides": overrides, "config": config},
    )
