"""`sparsebench-report <sweep dir>`: every results.json below it -> Markdown + CSV table + PNG plots.

Rows: model x method(+recovery) x sparsity/pattern (dense first). A preset is named by
its preset (`elsa_cpu`), never as the paper's method, and a recovery stage is appended
(`sparsegpt+finetune_cpu`). Columns: WikiText-2 and C4 perplexity, the dense perplexity
relative to each row's (% of dense retained: 100 for dense, lower is worse), every
zero-shot task, their mean and its % of dense, the budget (training tokens and optimizer
steps over all stages, wall time), prune time and peak memory. "% of dense" divides by
the dense run of the row's own protocol (same `protocol_id`: model, seqlen, eval data and
windows, dtype), never by another protocol's. Rows that fold together join their
protocols into one (a random model's seed is part of its protocol, and an older run's id
may have hashed a key the identity ignores today), so a folded row still finds its dense
run and its curve.

Seeds: runs whose configs differ only in the seed (`seed=0,1,2`) fold into one row with
mean, std and n; a row whose mean is within the two rows' spread (|difference| <= the sum
of their standard deviations) of another row at the same model, protocol, sparsity and
pattern is marked in the "within spread of" column. Rows that would read alike but ran
different configs carry the keys that differ in their label (`safe_cpu (method.rho=0)`).
`--by-tokens` groups the rows by training tokens, so rows of equal budget stand together.

Runs that did not complete are listed with their status and error, and a results.json
that cannot be read (cut off, hand-edited) is a row saying so: nothing is silently
dropped. Code and package versions are listed under the table, and so are the kernel environments
(CPU, ATen vector kernels, BLAS dispatch, threads): seeds fold, and rows are marked within
spread, only within one environment; rows of different environments are labelled [env N].

Plots: report.png, perplexity against sparsity per method (log scale, error bars where
seeds were folded, dense as a horizontal line); report_nonzero.png, perplexity against
the number of non-zero parameters (the Elsa paper's Figure 3 view), log-log.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from .ledger import digest, flatten, identity
from ..evaluation.zeroshot import STOCK_TASKS

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
    return (f"{kernels.get('cpu', '?')} / ATen {kernels.get('aten_capability', '?')} / "
            f"MKL_CBWR {kernels.get('mkl_cbwr', '?')} / {kernels.get('threads', '?')} threads")


def _label(cfg: dict[str, Any]) -> str:
    method = _dict(cfg.get("method"))
    label = str(method.get("preset") or method.get("name", "?"))
    recover = _dict(cfg.get("recover")).get("preset") or _dict(cfg.get("recover")).get("name")
    allocation = _dict(cfg.get("schedule")).get("allocation")
    if allocation and allocation != "uniform":  # OWL + Wanda is its own row
        label = f"{allocation}-{label}"
    return label + (f"+{recover}" if recover and recover != "none" else "")


def load_row(path: Path) -> dict[str, Any]:
    """One report row from one results.json; a file that is not what sparsebench writes
    becomes a row with status 'unreadable' and the reason, never a crash."""
    row: dict[str, Any] = {"path": str(path.parent), "status": "unreadable", "error": None, "model": "?", "method": "?",
                           "label": "?", "sparsity": None, "pattern": "?", "actual_sparsity": None, "protocol_id": None, "protocol_ids": [],
                           **{k: None for k in PPL}, "mean_acc": None, "prune_s": None, "peak_gib": None,
                           "train_tokens": None, "steps": None, "wall_s": None, "nonzero_params": None,
                           "seed": None, "fold_key": str(path), "ident": {}, "n": 1, "versions": {}, "kernels": None}
    try:
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        row["error"] = f"results.json unreadable: {str(err)[:80]}"
        return row
    cfg, sp = _dict(rec.get("config")), _dict(rec.get("sparsity"))
    seedless = _seedless(cfg) if cfg else None  # runs equal in everything but the seed fold together
    method = _dict(cfg.get("method")).get("name", "?")
    tasks = _dict(_dict(rec.get("zeroshot")).get("tasks"))
    metrics, memory = _dict(rec.get("metrics")), _dict(rec.get("memory"))
    stages = [_dict(v) for v in _dict(rec.get("budget")).values()]
    status = rec.get("status")
    row.update({
        "status": status if isinstance(status, str) else "unknown",
        "error": rec.get("error") if isinstance(rec.get("error"), str) else None,
        "model": str(_dict(cfg.get("model")).get("name", "?")),
        "method": str(method),
        "label": _label(cfg),
        "sparsity": 0.0 if method == "dense" else _num(cfg.get("sparsity")),
        "pattern": str(sp.get("pattern", cfg.get("pattern", "?"))),
        "actual_sparsity": _num(sp.get("actual_sparsity")),
        "protocol_id": rec.get("protocol_id") if isinstance(rec.get("protocol_id"), str) else None,
        "protocol_ids": [rec["protocol_id"]] if isinstance(rec.get("protocol_id"), str) else [],
        **{k: _num(metrics.get(k)) for k in PPL},
        **{t: _num(_dict(v).get("headline")) for t, v in tasks.items()},
        "mean_acc": _num(_dict(rec.get("zeroshot")).get("mean_acc")),
        "prune_s": _num(_dict(rec.get("timings_s")).get("prune")),
        "peak_gib": max((v for v in map(_num, memory.values()) if v is not None), default=None),
        "train_tokens": int(sum(_num(s.get("train_tokens")) or 0 for s in stages)) if stages else None,
        "steps": int(sum(_num(s.get("optimizer_steps")) or 0 for s in stages)) if stages else None,
        "wall_s": sum(_num(s.get("wall_s")) or 0 for s in stages) if stages else None,
        "nonzero_params": _num(sp.get("nonzero_params")),
        "seed": cfg.get("seed"),
        "ident": flatten(seedless) if cfg else {},
        "versions": _dict(rec.get("versions")),
        "kernels": kernel_signature(_dict(_dict(rec.get("versions")).get("kernels"))),
        "protocol_name": cfg.get("protocol"),
        "seqlen": _dict(cfg.get("model")).get("seqlen"),
        "calib_windows": _dict(rec.get("calibration")).get("windows", _dict(cfg.get("data")).get("nsamples")),
        "eval_windows": metrics.get("wikitext2_windows", metrics.get("c4_windows")),
    })
    # seeds fold only within one kernel environment: another CPU kind or BLAS dispatch moves a
    # chaotic row by more than its seed spread, and that is not seed noise
    row["fold_key"] = (digest(seedless) + (f"|{row['kernels']}" if row["kernels"] else "")) if cfg else str(path)
    if _dict(rec.get("model")).get("random_weights"):  # a measurement run: never a quality result
        row["label"] += " [random weights]"
    if cfg.get("sparsity") is not None and row["sparsity"] is None and method != "dense":
        row.update(status="unreadable", error=f"config.sparsity is not a number: {cfg.get('sparsity')!r}")
    return row


def load_results(root: Path) -> list[dict[str, Any]]:
    return [load_row(path) for path in sorted(Path(root).rglob("results.json"))]


# ----------------------------------------------------------------------------- seeds


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def fold_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Complete rows equal in all but the seed become one row: mean of every number,
    `<metric>_std` for the perplexities and mean accuracy, `n`, `seeds`. Other rows stay."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    out = []
    for r in rows:
        (groups[r["fold_key"]] if r["status"] == "complete" else out).append(r)
    numeric = [*PPL, "mean_acc", *STOCK_TASKS, "prune_s", "peak_gib", "wall_s", "actual_sparsity"]
    for members in groups.values():
        row = dict(members[0])
        row["n"] = len(members)
        row["protocol_ids"] = sorted({m["protocol_id"] for m in members if m["protocol_id"]})
        row["seeds"] = sorted(str(m["seed"]) for m in members)
        if len(members) > 1:
            row["path"] = "; ".join(m["path"] for m in members)
        for k in numeric:
            vals = [m[k] for m in members if m.get(k) is not None]
            if len(vals) == len(members) and vals:
                row[k], std = _mean_std(vals)
                if k in (*PPL, "mean_acc"):
                    row[f"{k}_std"] = std if len(vals) > 1 else None
        out.append(row)
    return out


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
        configs = len({r["fold_key"].split("|")[0] for r in members})  # kernel environments are labelled apart
        if configs < 2:
            continue

        def value(r, k):
            return repr(r["ident"].get(k, "<unset>"))

        def parts(keys):
            return len({tuple(value(r, k) for k in keys) for r in members})

        candidates = sorted(k for k in {k for r in members for k in r["ident"]} if len({value(r, k) for r in members}) > 1)
        chosen: list[str] = []
        while candidates and parts(chosen) < configs:
            best = max(candidates, key=lambda k: parts([*chosen, k]))  # max keeps the first (sorted) of ties
            chosen.append(best)
            candidates.remove(best)
        for r in members:
            r["label"] += " (" + ", ".join(f"{k}={r['ident'].get(k, '<unset>')}" for k in chosen) + ")"


def _protocol(row: dict[str, Any]) -> str | None:
    return row.get("protocol", row.get("protocol_id"))


def mark_within_spread(rows: list[dict[str, Any]], metric: str = "wikitext2") -> None:
    """Each folded row lists the rows (same model, protocol, sparsity, pattern) whose mean
    is within the two rows' spread: their difference is not beyond the seeds' noise."""
    for r in rows:
        r["within_spread_of"] = []
    folded = [r for r in rows if r.get("n", 1) > 1 and r.get(f"{metric}_std") is not None and r.get(metric) is not None]
    for a in folded:
        for b in folded:
            same = (a["model"], _protocol(a), a["sparsity"], a["pattern"], a.get("kernels")) == (
                b["model"], _protocol(b), b["sparsity"], b["pattern"], b.get("kernels"))
            if a is not b and same and abs(a[metric] - b[metric]) <= a[f"{metric}_std"] + b[f"{metric}_std"]:
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
    return (row["model"], row["method"] != "dense", row["label"], row["pattern"] != "unstructured",
            row["sparsity"] if row["sparsity"] is not None else -1, row["pattern"], row["path"])


def table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = fold_seeds(rows)
    name_variants(rows)
    rows = sorted(rows, key=_key)
    join_protocols(rows)
    dense = [r for r in rows if r["method"] == "dense" and r["status"] == "complete"]
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
        r["mean_acc_dense_retained_pct"] = round(100.0 * r["mean_acc"] / d["mean_acc"], 2) if ok else None
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


def _fmt(v, digits=2):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ppl(r: dict[str, Any], k: str) -> str:
    if r.get("n", 1) > 1 and r.get(f"{k}_std") is not None:
        return f"{r[k]:.2f} ± {r[f'{k}_std']:.2f} (n={r['n']})"
    return _fmt(r[k])


def _tokens(v) -> str:
    return "—" if v is None else f"{int(v):,}"


def _columns(rows: list[dict[str, Any]], tasks: list[str], spread: bool) -> list[tuple[str, Any]]:
    """(heading, cell function) of every column that says something for these rows: a column
    empty (or zero) for every row is left out (one-shot rows train nothing; their wall time
    is their prune time)."""
    def has(key, zero_is_empty=True):
        return any(r.get(key) not in (None, 0, 0.0) if zero_is_empty else r.get(key) is not None for r in rows)

    cols = [("model", lambda r: r["model"]), ("method", lambda r: r["label"]),
            ("sparsity", lambda r: _fmt(r["sparsity"])), ("actual", lambda r: _fmt(r["actual_sparsity"], 4)),
            ("pattern", lambda r: r["pattern"]),
            ("WikiText-2", lambda r: _ppl(r, "wikitext2")), ("C4", lambda r: _ppl(r, "c4")),
            ("% dense (Wiki)", lambda r: _fmt(r["wikitext2_dense_retained_pct"], 1)),
            ("% dense (C4)", lambda r: _fmt(r["c4_dense_retained_pct"], 1))]
    cols = [c for c in cols if c[0] not in ("C4", "% dense (C4)") or has("c4")]
    if tasks:
        cols += [(t, (lambda r, t=t: _fmt(r[t], 4))) for t in tasks]
        cols += [("mean acc", lambda r: _fmt(r["mean_acc"], 4)),
                 ("% dense (acc)", lambda r: _fmt(r["mean_acc_dense_retained_pct"], 1))]
    if has("train_tokens"):
        cols += [("train tokens", lambda r: _tokens(r["train_tokens"])), ("steps", lambda r: _tokens(r["steps"]))]
    cols.append(("prune s", lambda r: _fmt(r["prune_s"], 1)))
    if any(r.get("wall_s") is not None and r.get("prune_s") is not None and abs(r["wall_s"] - r["prune_s"]) > 0.05
           for r in rows):
        cols.append(("wall s", lambda r: _fmt(r["wall_s"], 1)))
    cols += [("peak GiB", lambda r: _fmt(r["peak_gib"])),
             ("status", lambda r: r["status"] if r["status"] == "complete" or not r.get("error")
              else f"{r['status']}: {_cell(r['error'])}")]
    if spread:
        cols.append(("within spread of", lambda r: ", ".join(r.get("within_spread_of") or []) or "—"))
    return cols


COLUMN_NOTES = {
    "sparsity": "the target sparsity (N:M: 0.50)",
    "actual": "the measured fraction of zeros over every pruned linear (differs from the target by rounding only)",
    "WikiText-2": "perplexity, exp(mean window NLL) over the protocol's windows; lower is better; mean ± std (n) over seeds",
    "C4": "perplexity on the C4 eval stream, as WikiText-2",
    "% dense (Wiki)": "dense perplexity / row perplexity x 100, against the dense run of the row's own protocol: "
                      "100 for dense, higher is better",
    "% dense (C4)": "as % dense (Wiki), on C4",
    "mean acc": "mean of the zero-shot tasks' headline accuracies; % dense (acc): row / dense x 100",
    "train tokens": "tokens seen by optimizer steps over every stage (block-wise methods: summed over blocks)",
    "steps": "optimizer steps over every stage",
    "prune s": "seconds of calibration, allocation and pruning",
    "wall s": "seconds of the training stages",
    "peak GiB": "peak memory of the run's process (GPU peak on CUDA)",
    "within spread of": "rows whose mean lies within the two rows' seed spread (same model, protocol, sparsity, "
                        "pattern and kernel environment)",
}


def _table_lines(rows: list[dict[str, Any]], tasks: list[str], spread: bool) -> list[str]:
    cols = _columns(rows, tasks, spread)
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(f(r)) for _, f in cols) + " |")
    return lines


def header(rows: list[dict[str, Any]], root: Path | None = None) -> list[str]:
    """The report's title and the protocols its rows ran under."""
    lines = [f"# sparsebench report{f': {root}' if root else ''}", ""]
    seen = {}
    for r in rows:
        if r["status"] == "complete" and r.get("seqlen"):
            key = (r["model"], r.get("protocol_name"), r.get("seqlen"), r.get("calib_windows"), r.get("eval_windows"))
            seen[key] = seen.get(key, 0) + 1
    for (model, name, seqlen, calib, evals), n in sorted(seen.items(), key=str):
        lines.append(f"- {model}, protocol {name or '?'}: seqlen {seqlen}, {calib if calib else 'no'} calibration "
                     f"windows, {evals if evals else '?'} evaluation windows per dataset ({n} rows)")
    return lines + [""] if seen else lines


def notes(rows: list[dict[str, Any]], tasks: list[str], spread: bool) -> str:
    heads = [h for h, _ in _columns(rows, tasks, spread)]
    return "\n".join(["", "Columns:"] + [f"- {h}: {COLUMN_NOTES[h]}" for h in heads if h in COLUMN_NOTES]) + "\n"


def markdown(rows: list[dict[str, Any]], by_tokens: bool = False, root: Path | None = None) -> str:
    """Perplexity columns' '% dense' is dense ppl / ppl; accuracy's is mean acc / dense mean acc."""
    tasks = zeroshot_tasks(rows)
    spread = any(r.get("n", 1) > 1 for r in rows)
    if not by_tokens:
        lines = _table_lines(rows, tasks, spread)
    else:
        lines = []
        budgets = sorted({r["train_tokens"] or 0 for r in rows})
        for tokens in budgets:
            group = [r for r in rows if (r["train_tokens"] or 0) == tokens]
            lines += ["", f"Training tokens: {tokens:,}", "", *_table_lines(group, tasks, spread)]
        lines = lines[1:]
    return "\n".join(header(rows, root) + lines) + "\n" + notes(rows, tasks, spread) + versions_note(rows)


def _cell(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def versions_note(rows: list[dict[str, Any]]) -> str:
    """The code and package versions the rows ran with: one line if they agree, else one
    line per distinct set with the number of rows."""
    keys = ("sparsebench_commit", "sparsebench", "torch", "transformers")
    seen: dict[tuple, int] = {}
    for r in rows:
        v = r.get("versions") or {}
        sig = tuple((k, v[k]) for k in keys if k in v)
        if sig:
            seen[sig] = seen.get(sig, 0) + 1
    lines = []
    if seen:
        lines += ["", "Versions:" if len(seen) == 1 else "Versions (rows ran with different code or packages):"]
        for sig, n in seen.items():
            lines.append(f"- {', '.join(f'{k} {v}' for k, v in sig)}" + ("" if len(seen) == 1 else f" ({n} rows)"))
    envs = sorted({r["kernels"] for r in rows if r.get("kernels")})
    if len(envs) == 1:
        lines += ["", f"Kernel environment: {envs[0]}."]
    elif envs:
        lines += ["", "Kernel environments (rows are labelled [env N]; the last bits of every reduction differ between",
                  "them, and a chaotic row, such as SparseGPT at 0.7 and above, can move by more than its seed spread;",
                  "compare rows within one environment):"]
        lines += [f"- env {i}: {e} ({sum(r.get('kernels') == e for r in rows)} rows)" for i, e in enumerate(envs, 1)]
    return "\n".join(lines) + "\n" if lines else ""


# ----------------------------------------------------------------------------- plots


def _series(rows, x_key: str, metric: str):
    protocols = defaultdict(set)
    for r in rows:
        if r["status"] == "complete":
            protocols[r["model"]].add(r.get("protocol"))
    series = defaultdict(list)
    for r in rows:
        if r["status"] == "complete" and r[metric] and r["pattern"] == "unstructured" and r.get(x_key) is not None:
            # one line per protocol: seqlen 512 and 2048 are different curves, never one
            tag = r["model"] if len(protocols[r["model"]]) == 1 else f"{r['model']}, protocol {str(r.get('protocol'))[:8]}"
            series[(tag, r["label"], r["method"] == "dense")].append((r[x_key], r[metric], r.get(f"{metric}_std")))
    return series


def _colours(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One colour per method label, the same in every plot of the report."""
    import matplotlib

    labels = sorted({r["label"] for r in rows if r["method"] != "dense"})
    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _plain_log_axis(axis) -> None:
    """Log scale with plain tick labels (250, 1000, 1e+05 only where needed), not 2.58x10^2."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}" if v < 1e6 else f"{v:.0e}"))
    axis.set_minor_formatter(NullFormatter())


def _figure(path: Path, xlabel: str, draw, metrics=("wikitext2", "c4"), log_x: bool = False) -> None:
    """WikiText-2 and C4 side by side, log-scale perplexity: `draw(ax, metric)` plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), dpi=120, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        draw(ax, metric)
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{ {'wikitext2': 'WikiText-2', 'c4': 'C4'}.get(metric, metric)} perplexity (log)")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][-1].legend(handles, labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _dodge(index: int, count: int, width: float) -> float:
    """A small x offset per series, so error bars at the same sparsity never overlap."""
    return (index - (count - 1) / 2) * width


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Perplexity against sparsity per method(+recovery), WikiText-2 and C4 side by side;
    error bars (seed folds) dodged apart."""
    colours = _colours(rows)

    def draw(ax, metric):
        series = sorted(_series(rows, "sparsity", metric).items())
        curves = [s for s in series if not s[0][2]]
        for (tag, label, dense), pts in series:
            if dense:
                ax.axhline(sorted(pts)[0][1], color="gray", ls="--", lw=1, label=f"dense ({tag})")
        for i, ((tag, label, _), pts) in enumerate(curves):
            pts.sort()
            dx = _dodge(i, len(curves), 0.004)
            ax.errorbar([p[0] + dx for p in pts], [p[1] for p in pts], yerr=[p[2] or 0 for p in pts], marker="o",
                        capsize=3, color=colours.get(label), label=f"{label} ({tag})")

    _figure(path, "sparsity", draw)


def plot_nonzero(rows: list[dict[str, Any]], path: Path) -> None:
    """Perplexity against the number of non-zero parameters (Elsa's Figure 3), log-log."""
    colours = _colours(rows)

    def draw(ax, metric):
        curves = sorted(_series(rows, "nonzero_params", metric).items())
        for i, ((tag, label, dense), pts) in enumerate(curves):
            pts.sort()
            f = 1 + _dodge(i, len(curves), 0.01)  # multiplicative: the x axis is log
            ax.errorbar([p[0] * f for p in pts], [p[1] for p in pts], yerr=[p[2] or 0 for p in pts],
                        marker="*" if dense else "o", ls="none" if dense else "-", capsize=3,
                        color="gray" if dense else colours.get(label), label=f"{label} ({tag})")

    _figure(path, "non-zero parameters (log)", draw, log_x=True)


def write_report(root: Path, out: Path | None = None, by_tokens: bool = False) -> dict[str, Path]:
    out = Path(out or root)
    rows = table(load_results(root))
    if not rows:
        raise SystemExit(f"sparsebench-report: no results.json under {root}")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "report.md", "csv": out / "report.csv", "plot": out / "report.png",
             "plot_nonzero": out / "report_nonzero.png"}
    paths["markdown"].write_text(markdown(rows, by_tokens, root))
    fields = list(dict.fromkeys(k for r in rows for k in r if k != "ident"))  # the label says what differs
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "versions": json.dumps(r.get("versions") or {}, sort_keys=True),
                             "seeds": " ".join(r.get("seeds") or []),
                             "within_spread_of": " ".join(r.get("within_spread_of") or [])})
    plot(rows, paths["plot"])
    plot_nonzero(rows, paths["plot_nonzero"])
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="sparsebench-report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="a sweep folder (or any folder with results.json files below it)")
    ap.add_argument("--out", type=Path, default=None, help="where report.md/.csv/.png go (default: root)")
    ap.add_argument("--by-tokens", action="store_true", help="group the table's rows by training tokens")
    ap.add_argument("--wandb", choices=["online", "offline"], default=None,
                    help="also log the table and the plot to a wandb run (group: the sweep folder's name)")
    ap.add_argument("--project", default="sparsebench")
    args = ap.parse_args(argv)
    if not args.root.is_dir():
        print(f"sparsebench-report: error: {args.root} is not a folder", file=sys.stderr)
        raise SystemExit(2)
    paths = write_report(args.root, args.out, args.by_tokens)
    print(paths["markdown"].read_text())
    print("wrote", ", ".join(str(p) for p in paths.values()))
    if args.wandb:
        log_to_wandb(paths, args.root, args.wandb, args.project)


def log_to_wandb(paths: dict[str, Path], root: Path, mode: str, project: str) -> None:
    import wandb

    with open(paths["csv"]) as f:
        rows = list(csv.reader(f))
    run = wandb.init(mode=mode, project=project, group=Path(root).resolve().name, job_type="report",
                     name=f"report-{Path(root).resolve().name}", dir=str(paths["csv"].parent))
    run.log({"report/table": wandb.Table(columns=rows[0], data=rows[1:]),
             "report/ppl_vs_sparsity": wandb.Image(str(paths["plot"])),
             "report/ppl_vs_nonzero": wandb.Image(str(paths["plot_nonzero"]))})
    run.finish()


if __name__ == "__main__":
    main()
