"""EvoPress (Sieberling et al., ICML 2025, "EvoPress: Accurate Dynamic Model Compression via
Evolutionary Search"): per-linear sparsities found by an evolutionary search over a database of
pre-pruned levels, scored by KL divergence to the dense model. Taken from the released code
(IST-DASLab/EvoPress: `prune.py` builds the database, `evo_prune_search.py` searches):

1. Database. Every pruned linear at the levels s_l = s + l x d / numel(W), l from -min(int(s //
   (d / numel)), L) to min(int((1 - s) // (d / numel)), L), L = `num_levels` (8), d =
   `weights_diff` (released default int(0.5 min(s, 1 - s) / L x hidden^2)): one level moves d
   weights of any linear, so swapping a level down in one linear and up in another keeps the
   total. Each level is pruned by the run's one-shot method from its statistics of the *dense*
   model's inputs (the released walk propagates the dense outputs: every level of a block sees
   the same inputs). Stored as bitmask + kept values, one file per linear, cached under
   $SPARSEBENCH_CACHE/evopress/<key> by (model, method and options, calibration draw, s, L, d),
   so a sweep over methods or seeds of the search reuses it; its bytes go to results.json.
2. Search (the released loop, call for call with Python's `random` seeded by the run's seed):
   from all levels 0, each generation makes `offspring` distinct children of the parent by
   1-3 level-switch mutations (min of two draws of randint(1, 3); each one level down in a
   random linear and one up in another, where those levels exist), then selects in stages:
   keep the `survivors[k]` best by KL divergence to the dense model on `tokens[k]` calibration
   tokens drawn at random (the parent joins before the last stage: elitist); the one survivor
   is the next parent. KL is the released running mean over 1024-position chunks of
   kl_div(log_softmax(student), log_softmax(dense), batchmean).
3. The pruned model is the database's weights at the found levels (as released: no second
   walk); each linear's mask is verified against its level's sparsity.

The search is resumable: its state (generation, parent, fitness, the random state) is written
to <run folder>/evopress_state.json after every generation and read back by the same run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import pickle
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import SparsebenchError
from .evopress_database import (  # noqa: F401 (masks_of_levels, levels_of: this stage's API)
    Database,
    build_database,
    database_key,
    levels_of,
    masks_of_levels,
    weights_diff,
)
from .sparsity import Pattern

log = logging.getLogger(__name__)

STATE_FILE = "evopress_state.json"


# ----------------------------------------------------------------------------- fitness


@torch.no_grad()
def kl_fitness(model: nn.Module, windows: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """The released `compute_kl_div`: KL(dense || model) per position, a running mean over
    chunks of 1024 positions weighted by their size (the last position not predicted)."""
    running, seen = 0, 0
    device = next(model.parameters()).device
    for ids, target in zip(windows, targets):
        logits = model(ids.to(device)).logits
        shift, shift_t = logits[:, :-1, :].contiguous(), target.to(device)[:, :-1, :]
        for i in range(0, shift.shape[1], 1024):
            j = min(i + 1024, shift.shape[1])
            a_b, t_b = shift[:, i:j, :], shift_t[:, i:j, :]
            loss = F.kl_div(
                a_b.reshape(-1, a_b.size(-1)).log_softmax(dim=-1),
                t_b.reshape(-1, t_b.size(-1)).log_softmax(dim=-1),
                log_target=True,
                reduction="batchmean",
            )
            a = t_b.numel() / (seen + t_b.numel())
            b = seen / (seen + t_b.numel())
            running = a * loss + b * running
            seen += t_b.numel()
    return float(running.item())


# ----------------------------------------------------------------------------- the search


class Levels:
    """The model's linears set to a configuration of database levels (only the changed ones
    are written, as the released `load_layers`)."""

    def __init__(self, model: nn.Module, db: Database):
        self.model, self.db = model, db
        self.state: list[int | None] = [None] * len(db.names)

    def load(self, config: list[int]) -> None:
        for name, new, old in zip(self.db.names, config, self.state):
            if new != old:
                layer = self.model.get_submodule(name)
                layer.weight.data = self.db.weight(name, new).to(
                    layer.weight.device, layer.weight.dtype
                )
        self.state = list(config)


def _minibatch(rng: random.Random, pool, targets, num_tokens: int):
    """Windows with exactly `num_tokens` tokens, drawn as released (distinct random ids, the
    last one cut)."""
    ids, data, logits, used = [], [], [], 0
    while used < num_tokens:
        i = rng.randint(0, len(pool) - 1)
        if i in ids:
            continue
        ids.append(i)
        if used + pool[i].shape[1] > num_tokens:
            data.append(pool[i][:, : num_tokens - used])
            logits.append(targets[i][:, : num_tokens - used])
            used = num_tokens
        else:
            data.append(pool[i])
            logits.append(targets[i])
            used += pool[i].shape[1]
    return data, logits


def _mutate(rng: random.Random, parent: list[int], db: Database, spec) -> list[int]:
    child = list(parent)
    names = db.names
    for _ in range(min(rng.randint(1, 3), rng.randint(1, 3))):  # biased towards fewer flips
        while True:  # a linear whose level can go down
            down = rng.randint(0, len(child) - 1)
            level = child[down]
            if abs(level - 1) > spec.max_level:
                continue
            if level - 1 in db.levels[names[down]]:
                break
        while True:  # and one whose level can go up
            up = rng.randint(0, len(child) - 1)
            level = child[up]
            if abs(level + 1) > spec.max_level:
                continue
            if level + 1 in db.levels[names[up]]:
                break
        child[down] -= 1
        child[up] += 1
    return child


def search(
    levels: Levels,
    pool: list[torch.Tensor],
    targets: list[torch.Tensor],
    spec,
    seed: int,
    state_file: Path | None = None,
    log_fn=lambda metrics: None,
) -> dict[str, Any]:
    """The released evolutionary search; returns the found levels and the search's record."""
    rng = random.Random(seed)
    db = levels.db
    parent = [0] * len(db.names)
    fitness, start_gen, history = float("inf"), 0, []
    resumed = False
    if state_file is not None and state_file.is_file():
        saved = json.loads(state_file.read_text())
        if saved.get("key") == _search_key(db, spec, seed, pool):
            parent, fitness, start_gen = saved["parent"], saved["fitness"], saved["generation"]
            history = saved["history"]
            rng.setstate(pickle.loads(base64.b64decode(saved["random_state"])))
            resumed = True
            log.info("evopress: resuming the search at generation %d", start_gen + 1)
    start = time.perf_counter()
    for gen in range(start_gen, spec.generations):
        children: list[list[int]] = []
        while len(children) < spec.offspring:
            child = _mutate(rng, parent, db, spec)
            if child in children:
                continue
            if sum(map(abs, child)) > spec.max_total_deviation:
                continue
            children.append(child)
        for keep, tokens in zip(spec.survivors, spec.tokens):
            if keep == spec.survivors[-1] and parent not in children:
                children.append(parent)  # elitist: the parent competes in the last stage
            data, logits = _minibatch(rng, pool, targets, tokens)
            scores = []
            for child in children:
                levels.load(child)
                scores.append(kl_fitness(levels.model, data, logits))
            best = np.argsort(scores)[:keep]
            children, scores = [children[i] for i in best], [scores[i] for i in best]
        parent, fitness = children[0], scores[0]
        history.append(fitness)
        log.info(
            "evopress: generation %d/%d, best fitness %.4e", gen + 1, spec.generations, fitness
        )
        log_fn({"evopress/generation": gen + 1, "evopress/fitness": fitness})
        if state_file is not None:
            state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({
                "key": _search_key(db, spec, seed, pool), "generation": gen + 1, "parent": parent,
                "fitness": fitness, "history": history,
                "random_state": base64.b64encode(pickle.dumps(rng.getstate())).decode(),
            }))  # fmt: skip
            tmp.replace(state_file)
    levels.load(parent)
    return {
        "levels": dict(zip(db.names, parent)),
        "fitness": fitness if history else None,  # no generation: the uniform levels
        "fitness_history": history,
        "generations": spec.generations,
        "resumed": resumed,
        "search_s": round(time.perf_counter() - start, 3),
    }


def _search_key(db: Database, spec, seed: int, pool) -> str:
    what = [str(db.folder), repr(spec), seed, len(pool), int(pool[0].shape[1])]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------- the stage


def _model_id(model: nn.Module) -> str:
    """The model's config and a sample of every pruned linear's weights (the database's key)."""
    from .models import prunable_linears

    h = hashlib.sha256(model.config.to_json_string().encode())
    for name, lin in prunable_linears(model).items():
        h.update(name.encode())
        h.update(lin.weight.detach()[:2].float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def _method_id(pruner) -> dict:
    import dataclasses

    options = dataclasses.asdict(pruner) if dataclasses.is_dataclass(pruner) else {}
    return {"name": pruner.name, **{k: repr(v) for k, v in options.items()}}


@torch.no_grad()
def allocate_evopress(
    spec, model, calib, sparsity: float, pattern: Pattern, pruner, device, seed: int = 0,
    workdir: Path | None = None, log_fn=lambda metrics: None,
):  # fmt: skip
    """(per-linear targets, per-block realized sparsities, the report, the database)."""
    from .models import cache_root, find_blocks

    if calib is None:
        raise SparsebenchError("schedule=evopress needs calibration windows (data.nsamples > 0)")
    walker = pruner.refinable()
    diff = weights_diff(spec, sparsity, int(model.config.hidden_size))
    if diff <= 0:
        raise SparsebenchError(
            f"schedule.evopress.weights_diff resolves to {diff} at sparsity {sparsity}: set it > 0"
        )
    key = database_key(_model_id(model), _method_id(walker), calib, sparsity, diff, spec.num_levels)
    folder = cache_root() / "evopress" / key
    start = time.perf_counter()
    if (folder / "index.json").is_file():
        db, built = Database(folder), False
        log.info("evopress: level database reused from %s", folder)
    else:
        meta = {"method": walker.name, "sparsity": sparsity, "weights_diff": diff,
                "num_levels": spec.num_levels}  # fmt: skip
        db = build_database(folder, walker, model, calib, sparsity, pattern, diff,
                            spec.num_levels, device, meta)  # fmt: skip
        built = True
    db_s = time.perf_counter() - start
    windows = spec.kl_windows or calib.shape[0]
    pool = [calib[i : i + 1] for i in range(min(windows, calib.shape[0]))]
    tokens = len(pool) * pool[0].shape[1]
    if max(spec.tokens) > tokens:
        raise SparsebenchError(
            f"schedule.evopress.tokens asks for {max(spec.tokens)} tokens and the search's pool "
            f"holds {tokens} ({len(pool)} windows of {pool[0].shape[1]}): lower the tokens or "
            "raise schedule.evopress.kl_windows / data.nsamples"
        )
    model.to(device)
    targets = [model(w.to(device)).logits.cpu() for w in pool]  # the dense model's logits
    levels = Levels(model, db)
    state = Path(workdir) / STATE_FILE if workdir is not None else None
    found = search(levels, pool, targets, spec, seed, state, log_fn)
    levels.load([0] * len(db.names))
    uniform = kl_fitness(model, pool, targets)  # the database's uniform levels on the whole pool
    levels.load([found["levels"][n] for n in db.names])
    final = kl_fitness(model, pool, targets)
    linear_targets = {n: db.levels[n][lv] for n, lv in found["levels"].items()}
    path, blocks = find_blocks(model)
    per_block = []
    for i in range(len(blocks)):
        names = [n for n in db.names if n.startswith(f"{path}.{i}.")]
        numel = [int(np.prod(db.shapes[n])) for n in names]
        per_block.append(sum(linear_targets[n] * k for n, k in zip(names, numel)) / sum(numel))
    total = sum(int(np.prod(s)) for s in db.shapes.values())
    report = {
        "kind": "evopress",
        "targets": per_block,
        "linear_targets": linear_targets,
        "levels": found["levels"],
        "expected_sparsity": sum(linear_targets[n] * int(np.prod(db.shapes[n])) for n in db.names)
        / total,  # fmt: skip
        "search": {k: v for k, v in found.items() if k != "levels"},
        "kl_pool": {"windows": len(pool), "tokens": tokens},
        "kl_uniform_levels": uniform,
        "kl_found_levels": final,
        "database": {
            "folder": str(folder),
            "built": built,
            "seconds": round(db_s, 3),
            "bytes": db.bytes(),
            "method": walker.name,
            "weights_diff": diff,
            "num_levels": spec.num_levels,
            "linears": len(db.names),
        },
        "options": {
            "generations": spec.generations,
            "offspring": spec.offspring,
            "survivors": list(spec.survivors),
            "tokens": list(spec.tokens),
            "seed": seed,
        },  # fmt: skip
    }
    log.info(
        "evopress: KL to dense %.4e at the uniform levels, %.4e at the found ones (%d generations)",
        uniform, final, spec.generations,
    )  # fmt: skip
    return linear_targets, per_block, report, db
