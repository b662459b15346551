"""The rows of a report: every results.json below a folder read into one row each (a file
that cannot be read is a row saying so), seeds folded within one config and one kernel
environment, variants named by the keys that differ, rows marked within each other's spread,
and the dense row of each protocol found for "% of dense" (records/report.py formats them)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..evaluation.zeroshot import STOCK_TASKS
from .labels import dense_row, label_of, quant_tag
from .ledger import digest, flatten, identity

PPL = ("wikitext2", "c4")
SEED_KEYS = (("seed",), ("data", "seed"), ("method", "seed"), ("recover", "seed"))


def _num(value) -> float | None:
    """A number from a results.json field, None for anything else (a hand edit, a string)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _seedless(config: dict[str, Any]) -> dict[str, Any]:
    """The config's identity without its seeds."""
    ident = identity(config)  # a fresh copy
    for path in SEED_KEYS:
        node = ident
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return ident


def kernel_signature(kernels: dict[str, Any] | None) -> str | None:
    """One short string naming a kernel environment (for the report): runs with different
    signatures may differ in every last bit."""
    if not kernels:
        return None
    return (
        f"{kernels.get('cpu', '?')} / ATen {kernels.get('aten_capability', '?')} / "
        f"MKL_CBWR {kernels.get('mkl_cbwr', '?')} / {kernels.get('threads', '?')} threads"
    )


def load_row(path: Path) -> dict[str, Any]:
    """One report row from one results.json; a file that is not what sparsebench writes
    becomes a row with status 'unreadable' and the reason, never a crash."""
    row: dict[str, Any] = {
        "path": str(path.parent),
        "status": "unreadable",
        "error": None,
        "model": "?",
        "method": "?",
        "label": "?",
        "sparsity": None,
        "pattern": "?",
        "actual_sparsity": None,
        "protocol_id": None,
        "protocol_ids": [],
        **{k: None for k in PPL},
        "mean_acc": None,
        "prune_s": None,
        "peak_gib": None,
        "train_tokens": None,
        "steps": None,
        "wall_s": None,
        "nonzero_params": None,
        "decode_speedup": None,
        "prefill_speedup": None,
        "bitmask_mb": None,
        "speed_suspect": [],
        "warnings": [],
        "count_rule": None,
        "reloaded_from": None,
        "seed": None,
        "fold_key": str(path),
        "ident": {},
        "n": 1,
        "versions": {},
        "kernels": None,
    }
    try:
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        row["error"] = f"results.json unreadable: {str(err)[:80]}"
        return row
    cfg, sp = _dict(rec.get("config")), _dict(rec.get("sparsity"))
    seedless = (
        _seedless(cfg) if cfg else None
    )  # runs equal in everything but the seed fold together
    method = _dict(cfg.get("method")).get("name", "?")
    tasks = _dict(_dict(rec.get("zeroshot")).get("tasks"))
    metrics, memory = _dict(rec.get("metrics")), _dict(rec.get("memory"))
    stages = [_dict(v) for v in _dict(rec.get("budget")).values()]
    status = rec.get("status")
    row.update(
        {
            "status": status if isinstance(status, str) else "unknown",
            "error": rec.get("error") if isinstance(rec.get("error"), str) else None,
            "model": str(_dict(cfg.get("model")).get("name", "?")),
            "method": str(method),
            "label": label_of(cfg),
            "sparsity": 0.0 if method == "dense" else _num(cfg.get("sparsity")),
            "pattern": str(sp.get("pattern", cfg.get("pattern", "?"))),
            "actual_sparsity": _num(sp.get("actual_sparsity")),
            "protocol_id": rec.get("protocol_id")
            if isinstance(rec.get("protocol_id"), str)
            else None,
            "protocol_ids": [rec["protocol_id"]] if isinstance(rec.get("protocol_id"), str) else [],
            **{k: _num(metrics.get(k)) for k in PPL},
            **{t: _num(_dict(v).get("headline")) for t, v in tasks.items()},
            "mean_acc": _num(_dict(rec.get("zeroshot")).get("mean_acc")),
            "prune_s": _num(_dict(rec.get("timings_s")).get("prune")),
            "peak_gib": max((v for v in map(_num, memory.values()) if v is not None), default=None),
            "train_tokens": int(sum(_num(s.get("train_tokens")) or 0 for s in stages))
            if stages
            else None,
            "steps": int(sum(_num(s.get("optimizer_steps")) or 0 for s in stages))
            if stages
            else None,
            "wall_s": sum(_num(s.get("wall_s")) or 0 for s in stages) if stages else None,
            "nonzero_params": _num(sp.get("nonzero_params")),
            # a non-uniform allocation's per-block targets (OWL's rule, EvoPress's realized)
            "block_targets": [
                v for v in _dict(rec.get("allocation")).get("targets") or [] if _num(v) is not None
            ],
            # what sparsity buys (evaluation/speed.py, formats.py): side-by-side ratios of one run
            "decode_speedup": _num(_dict(_dict(rec.get("speed")).get("speedup")).get("decode_b1")),
            "prefill_speedup": _num(
                _dict(_dict(rec.get("speed")).get("speedup")).get("prefill_b1")
            ),
            "bitmask_mb": (_num(_dict(rec.get("size")).get("model_bitmask")) or 0) / 1e6 or None,
            # the bits a stored model needs per weight of its pruned linears (quant.bits_of)
            "bits_per_weight": _num(
                _dict(_dict(rec.get("size")).get("bits")).get("bits_per_pruned_weight")
            ),
            "quant": quant_tag(cfg),
            "seed": cfg.get("seed"),
            "ident": flatten(seedless) if cfg else {},
            "versions": _dict(rec.get("versions")),
            "kernels": kernel_signature(_dict(_dict(rec.get("versions")).get("kernels"))),
            "protocol_name": cfg.get("protocol"),
            "seqlen": _dict(cfg.get("model")).get("seqlen"),
            "calib_windows": _dict(rec.get("calibration")).get(
                "windows", _dict(cfg.get("data")).get("nsamples")
            ),
            "eval_windows": metrics.get("wikitext2_windows", metrics.get("c4_windows")),
        }
    )
    # seeds fold only within one kernel environment: another CPU kind or BLAS dispatch moves a
    # chaotic row by more than its seed spread, and that is not seed noise
    row["fold_key"] = (
        (digest(seedless) + (f"|{row['kernels']}" if row["kernels"] else "")) if cfg else str(path)
    )
    row["speed_suspect"] = [str(x) for x in _dict(rec.get("speed")).get("suspect") or []]
    row["warnings"] = [str(x) for x in _dict(rec.get("method_report")).get("warnings") or []]
    row["count_rule"] = sp.get("count_rule") if isinstance(sp.get("count_rule"), str) else None
    row["sort_label"] = row["label"]
    source = _dict(rec.get("loaded_pruned_model"))
    if source:  # a reloaded export: the pruned model it is, beside the run it came from
        reloaded(row, source, cfg)
    if _dict(rec.get("model")).get("random_weights"):  # a measurement run: never a quality result
        row["label"] += " [random weights]"
    if (
        cfg.get("sparsity") is not None
        and row["sparsity"] is None
        and method != "dense"
        and row["status"] != "refused"  # a refused job says why itself
    ):
        row.update(
            status="unreadable", error=f"config.sparsity is not a number: {cfg.get('sparsity')!r}"
        )
    return row


def reloaded(row: dict[str, Any], source: dict[str, Any], cfg: dict[str, Any]) -> None:
    """A run of `model=local model.path=<export> method=dense` is the export's pruned model:
    its method, sparsity and model from the export's sparsebench.json, labelled as reloaded,
    sorted beside its source run, and compared with the source's dense run when it was
    evaluated as the source was (same seqlen, windows and datasets)."""
    label = str(source.get("label") or source.get("method", "?"))
    again = label_of(cfg).removeprefix("dense")  # a recovery run on the reloaded masks
    row.update(
        method=str(source.get("method", "?")),
        model=str(source.get("model", row["model"])),
        label=f"{label} (reloaded){again}",
        sort_label=label,
        sparsity=_num(source.get("sparsity")),
        reloaded_from=source.get("run") or _dict(cfg.get("model")).get("path"),
    )
    ev, data = _dict(source.get("evaluation")), _dict(source.get("data"))
    same_eval = (
        data.get("seqlen") == _dict(cfg.get("model")).get("seqlen")
        and ev.get("max_windows") == _dict(cfg.get("eval")).get("max_windows")
        and list(ev.get("datasets") or []) == list(_dict(cfg.get("eval")).get("datasets") or [])
    )
    if same_eval and isinstance(source.get("protocol_id"), str):
        row["protocol_ids"] = [source["protocol_id"], *row["protocol_ids"]]
        row["protocol_id"] = source["protocol_id"]


def load_results(root: Path) -> list[dict[str, Any]]:
    return [load_row(path) for path in sorted(Path(root).rglob("results.json"))]


# ----------------------------------------------------------------------------- seeds


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


# folded like perplexity: mean, and `<key>_std` over the runs folded
FOLDED_WITH_STD = (*PPL, "mean_acc", "decode_speedup", "prefill_speedup", "bitmask_mb")


def fold_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Complete rows equal in all but the seed become one row: mean of every number,
    `<metric>_std` for perplexity, accuracy, speed-ups and size, `n`, `seeds`. Runs of the
    same seed (a measurement repeated) are repeats, not seeds: `fold` says which it is
    ("seeds": every run its own seed; "repeats": one seed run n times; "runs": both), and
    `repeats` counts the runs of each repeated seed. Other rows stay as they are."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    out = []
    for r in rows:
        (groups[r["fold_key"]] if r["status"] == "complete" else out).append(r)
    numeric = [*FOLDED_WITH_STD, *STOCK_TASKS, "prune_s", "peak_gib", "wall_s", "actual_sparsity"]
    for members in groups.values():
        row = dict(members[0])
        row["n"] = len(members)
        row["protocol_ids"] = sorted({m["protocol_id"] for m in members if m["protocol_id"]})
        row["seeds"] = sorted(str(m["seed"]) for m in members)
        counts = {seed: row["seeds"].count(seed) for seed in dict.fromkeys(row["seeds"])}
        row["repeats"] = {seed: c for seed, c in counts.items() if c > 1}
        row["fold"] = "seeds" if not row["repeats"] else "repeats" if len(counts) == 1 else "runs"
        row["speed_suspect"] = list(
            dict.fromkeys(x for m in members for x in m.get("speed_suspect") or [])
        )
        row["speed_suspect_runs"] = sum(bool(m.get("speed_suspect")) for m in members)
        row["warnings"] = list(dict.fromkeys(x for m in members for x in m.get("warnings") or []))
        if len(members) > 1:
            row["path"] = "; ".join(m["path"] for m in members)
        for k in numeric:
            vals = [m[k] for m in members if m.get(k) is not None]
            if len(vals) == len(members) and vals:
                row[k], std = _mean_std(vals)
                if k in FOLDED_WITH_STD:
                    row[f"{k}_std"] = std if len(vals) > 1 else None
        out.append(row)
    return out


def fold_text(r: dict[str, Any]) -> str:
    """What a folded row's n counts: "n=3 seeds", "n=3 repeats of seed 0", "n=4: seeds 0, 1;
    seed 0 x3"."""
    n = r.get("n", 1)
    if r.get("fold") == "repeats":
        return f"n={n} repeats of seed {r['seeds'][0]}"
    if r.get("fold") == "runs":
        distinct = ", ".join(dict.fromkeys(r["seeds"]))
        again = "; ".join(f"seed {s} x{c}" for s, c in r["repeats"].items())
        return f"n={n}: seeds {distinct}; {again}"
    return f"n={n} seeds"


def name_variants(rows: list[dict[str, Any]]) -> None:
    """Rows that would read alike (same model, label, sparsity, pattern) but ran different
    configs (an override such as `recover.lr=3e-3` or `method.rho=0`) get appended to their
    label the fewest config keys that tell them apart (chosen greedily, the key with most
    distinct values first), so that no two rows of a table look the same."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["ident"]:  # an unreadable row already says what it is
            groups[(r["model"], r["label"], r["sparsity"], r["pattern"])].append(r)
    for members in groups.values():
        configs = len(
            {r["fold_key"].split("|")[0] for r in members}
        )  # kernel environments are labelled apart
        if configs < 2:
            continue

        def value(r, k):
            return repr(r["ident"].get(k, "<unset>"))

        def parts(keys):
            return len({tuple(value(r, k) for k in keys) for r in members})

        candidates = sorted(
            k
            for k in {k for r in members for k in r["ident"]}
            if len({value(r, k) for r in members}) > 1
        )
        chosen: list[str] = []
        while candidates and parts(chosen) < configs:
            best = max(
                candidates, key=lambda k: parts([*chosen, k])
            )  # max keeps the first (sorted) of ties
            chosen.append(best)
            candidates.remove(best)
        for r in members:
            r["label"] += (
                " (" + ", ".join(f"{k}={r['ident'].get(k, '<unset>')}" for k in chosen) + ")"
            )


def _protocol(row: dict[str, Any]) -> str | None:
    return row.get("protocol", row.get("protocol_id"))


def mark_within_spread(rows: list[dict[str, Any]], metric: str = "wikitext2") -> None:
    """Each folded row lists the rows (same model, protocol, sparsity, pattern) whose mean
    is within the two rows' spread: their difference is not beyond the seeds' noise."""
    for r in rows:
        r["within_spread_of"] = []
    folded = [
        r
        for r in rows
        if r.get("n", 1) > 1 and r.get(f"{metric}_std") is not None and r.get(metric) is not None
    ]
    for a in folded:
        for b in folded:
            same = (a["model"], _protocol(a), a["sparsity"], a["pattern"], a.get("kernels")) == (
                b["model"],
                _protocol(b),
                b["sparsity"],
                b["pattern"],
                b.get("kernels"),
            )
            if (
                a is not b
                and same
                and abs(a[metric] - b[metric]) <= a[f"{metric}_std"] + b[f"{metric}_std"]
            ):
                a["within_spread_of"].append(b["label"])


# ----------------------------------------------------------------------------- the table


def join_protocols(rows: list[dict[str, Any]]) -> None:
    """row["protocol"]: one name for every protocol id linked to the row's through folded
    rows (union of the ids each folded row holds), so that "% of dense", the spread marks
    and the plot's curves compare rows of one protocol even across a seed fold."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for r in rows:
        for other in r["protocol_ids"][1:]:
            a, b = find(r["protocol_ids"][0]), find(other)
            parent[max(a, b)] = min(a, b)
    for r in rows:
        r["protocol"] = find(r["protocol_ids"][0]) if r["protocol_ids"] else None


def _dense_for(row: dict[str, Any], dense: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The complete dense run of the row's protocol (results from before protocol ids:
    the model's only dense run, if it has exactly one)."""
    if row["protocol"]:
        return next((d for d in dense if d["protocol"] == row["protocol"]), None)
    same = [d for d in dense if d["model"] == row["model"]]
    return same[0] if len(same) == 1 else None


def _key(row):
    # a reloaded export stands right after the run it came from (same label, sparsity, pattern)
    return (
        row["model"],
        not dense_row(row),
        row.get("sort_label") or row["label"],
        row["pattern"] != "unstructured",
        row["sparsity"] if row["sparsity"] is not None else -1,
        row["pattern"],
        row.get("reloaded_from") is not None,
        row["label"],
        row["path"],
    )


def table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = fold_seeds(rows)
    name_variants(rows)
    rows = sorted(rows, key=_key)
    join_protocols(rows)
    dense = [r for r in rows if dense_row(r) and r["status"] == "complete"]
    tasks = zeroshot_tasks(rows)
    for r in rows:
        d = _dense_for(r, dense)
        for k in PPL:
            ok = d is not None and d.get(k) and r.get(k)
            r[f"{k}_dense_retained_pct"] = round(100.0 * d[k] / r[k], 2) if ok else None
            r.setdefault(f"{k}_std", None)
        for t in tasks:
            r.setdefault(t, None)
        ok = d is not None and d.get("mean_acc") and r.get("mean_acc") is not None
        r["mean_acc_dense_retained_pct"] = (
            round(100.0 * r["mean_acc"] / d["mean_acc"], 2) if ok else None
        )
        r.setdefault("seeds", [])
    label_kernel_environments(rows)
    mark_within_spread(rows)
    return rows


def label_kernel_environments(rows: list[dict[str, Any]]) -> list[str]:
    """When the rows ran in more than one kernel environment (CPU kind, ATen vector kernels,
    BLAS dispatch, threads), each row's label names its environment ([env 1], [env 2], ...,
    listed under the table), so no two rows of different environments read as one
    comparison. Returns the environments in order."""
    envs = sorted({r["kernels"] for r in rows if r.get("kernels")})
    if len(envs) > 1:
        for r in rows:
            if r.get("kernels"):
                r["label"] += f" [env {envs.index(r['kernels']) + 1}]"
    return envs


def zeroshot_tasks(rows: list[dict[str, Any]]) -> list[str]:
    return [t for t in STOCK_TASKS if any(r.get(t) is not None for r in rows)]
