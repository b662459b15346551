"""`sparsebench-report <sweep dir>`: every results.json below it -> Markdown + CSV table + PNG plot.

Rows: model x method x sparsity/pattern (dense first); columns: WikiText-2 and C4
perplexity, the dense perplexity relative to each row's (% of dense retained: 100 for
dense, lower is worse), every zero-shot task, their mean and its % of dense, prune
time and peak memory. "% of dense" divides by the dense run of the row's own protocol
(same `protocol_id`: model, seqlen, eval data and windows, dtype), never by another
protocol's. Runs that did not complete are listed with their status and error, and a
results.json that cannot be read (cut off, hand-edited) is a row saying so, so nothing
is silently dropped. Code and package versions are listed under the table. The plot is
perplexity against sparsity per method on a log scale, dense as a horizontal line.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from .zeroshot import STOCK_TASKS

PPL = ("wikitext2", "c4")


def _num(value) -> float | None:
    """A number from a results.json field, None for anything else (a hand edit, a string)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def load_row(path: Path) -> dict[str, Any]:
    """One report row from one results.json; a file that is not what sparsebench writes
    becomes a row with status 'unreadable' and the reason, never a crash."""
    row: dict[str, Any] = {"path": str(path.parent), "status": "unreadable", "error": None, "model": "?", "method": "?",
                           "sparsity": None, "pattern": "?", "actual_sparsity": None, "protocol_id": None,
                           **{k: None for k in PPL}, "mean_acc": None, "prune_s": None, "peak_gib": None, "versions": {}}
    try:
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        row["error"] = f"results.json unreadable: {str(err)[:80]}"
        return row
    cfg, sp = _dict(rec.get("config")), _dict(rec.get("sparsity"))
    method = _dict(cfg.get("method")).get("name", "?")
    tasks = _dict(_dict(rec.get("zeroshot")).get("tasks"))
    metrics, memory = _dict(rec.get("metrics")), _dict(rec.get("memory"))
    status = rec.get("status")
    row.update({
        "status": status if isinstance(status, str) else "unknown",
        "error": rec.get("error") if isinstance(rec.get("error"), str) else None,
        "model": str(_dict(cfg.get("model")).get("name", "?")),
        "method": str(method),
        "sparsity": 0.0 if method == "dense" else _num(cfg.get("sparsity")),
        "pattern": str(sp.get("pattern", cfg.get("pattern", "?"))),
        "actual_sparsity": _num(sp.get("actual_sparsity")),
        "protocol_id": rec.get("protocol_id") if isinstance(rec.get("protocol_id"), str) else None,
        **{k: _num(metrics.get(k)) for k in PPL},
        **{t: _num(_dict(v).get("headline")) for t, v in tasks.items()},
        "mean_acc": _num(_dict(rec.get("zeroshot")).get("mean_acc")),
        "prune_s": _num(_dict(rec.get("timings_s")).get("prune")),
        "peak_gib": max((v for v in map(_num, memory.values()) if v is not None), default=None),
        "versions": _dict(rec.get("versions")),
    })
    if cfg.get("sparsity") is not None and row["sparsity"] is None and method != "dense":
        row.update(status="unreadable", error=f"config.sparsity is not a number: {cfg.get('sparsity')!r}")
    return row


def load_results(root: Path) -> list[dict[str, Any]]:
    return [load_row(path) for path in sorted(Path(root).rglob("results.json"))]


def _dense_for(row: dict[str, Any], dense: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The complete dense run of the row's protocol (results from before protocol ids:
    the model's only dense run, if it has exactly one)."""
    if row["protocol_id"]:
        return next((d for d in dense if d["protocol_id"] == row["protocol_id"]), None)
    same = [d for d in dense if d["model"] == row["model"]]
    return same[0] if len(same) == 1 else None


def _key(row):
    return (row["model"], row["method"] != "dense", row["method"], row["pattern"] != "unstructured",
            row["sparsity"] if row["sparsity"] is not None else -1, row["pattern"], row["path"])


def table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = sorted(rows, key=_key)
    dense = [r for r in rows if r["method"] == "dense" and r["status"] == "complete"]
    tasks = zeroshot_tasks(rows)
    for r in rows:
        d = _dense_for(r, dense)
        for k in PPL:
            ok = d is not None and d.get(k) and r.get(k)
            r[f"{k}_dense_retained_pct"] = round(100.0 * d[k] / r[k], 2) if ok else None
        for t in tasks:
            r.setdefault(t, None)
        ok = d is not None and d.get("mean_acc") and r.get("mean_acc") is not None
        r["mean_acc_dense_retained_pct"] = round(100.0 * r["mean_acc"] / d["mean_acc"], 2) if ok else None
    return rows


def zeroshot_tasks(rows: list[dict[str, Any]]) -> list[str]:
    return [t for t in STOCK_TASKS if any(r.get(t) is not None for r in rows)]


def _fmt(v, digits=2):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    """Perplexity columns' '% dense' is dense ppl / ppl; accuracy's is mean acc / dense mean acc."""
    tasks = zeroshot_tasks(rows)
    zs_head = [*tasks, "mean acc", "% dense (acc)"] if tasks else []
    head = ["model", "method", "sparsity", "pattern", "WikiText-2", "C4", "% dense (Wiki)", "% dense (C4)",
            *zs_head, "prune s", "peak GiB", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        zs = [*(_fmt(r[t], 4) for t in tasks), _fmt(r["mean_acc"], 4), _fmt(r["mean_acc_dense_retained_pct"], 1)] if tasks else []
        cells = [r["model"], r["method"], _fmt(r["sparsity"]), r["pattern"], _fmt(r["wikitext2"]), _fmt(r["c4"]),
                 _fmt(r["wikitext2_dense_retained_pct"], 1), _fmt(r["c4_dense_retained_pct"], 1),
                 *zs, _fmt(r["prune_s"], 1), _fmt(r["peak_gib"]), r["status"]]
        if r["status"] != "complete" and r.get("error"):
            cells[-1] = f"{r['status']}: {_cell(r['error'])}"
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n" + versions_note(rows)


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
    if not seen:
        return ""
    lines = ["", "Versions:" if len(seen) == 1 else "Versions (rows ran with different code or packages):"]
    for sig, n in seen.items():
        lines.append(f"- {', '.join(f'{k} {v}' for k, v in sig)}" + ("" if len(seen) == 1 else f" ({n} rows)"))
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, metric: str = "wikitext2") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    series = defaultdict(list)
    protocols = defaultdict(set)
    for r in rows:
        protocols[r["model"]].add(r["protocol_id"])
    for r in rows:
        if r["status"] == "complete" and r[metric] and r["pattern"] == "unstructured" and r["sparsity"] is not None:
            # one line per protocol: seqlen 512 and 2048 are different curves, never one
            tag = r["model"] if len(protocols[r["model"]]) == 1 else f"{r['model']}, protocol {str(r['protocol_id'])[:8]}"
            series[(tag, r["method"])].append((r["sparsity"], r[metric]))
    for (tag, method), pts in sorted(series.items()):
        pts.sort()
        if method == "dense":
            ax.axhline(pts[0][1], color="gray", ls="--", lw=1, label=f"dense ({tag})")
        else:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} ({tag})")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"{metric} perplexity (log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(root: Path, out: Path | None = None) -> dict[str, Path]:
    out = Path(out or root)
    rows = table(load_results(root))
    if not rows:
        raise SystemExit(f"sparsebench-report: no results.json under {root}")
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "report.md", "csv": out / "report.csv", "plot": out / "report.png"}
    paths["markdown"].write_text(markdown(rows))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({**r, "versions": json.dumps(r.get("versions") or {}, sort_keys=True)} for r in rows)
    plot(rows, paths["plot"])
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="sparsebench-report", description=__doc__)
    ap.add_argument("root", type=Path, help="a sweep folder (or any folder with results.json files below it)")
    ap.add_argument("--out", type=Path, default=None, help="where report.md/.csv/.png go (default: root)")
    ap.add_argument("--wandb", choices=["online", "offline"], default=None,
                    help="also log the table and the plot to a wandb run (group: the sweep folder's name)")
    ap.add_argument("--project", default="sparsebench")
    args = ap.parse_args(argv)
    if not args.root.is_dir():
        print(f"sparsebench-report: error: {args.root} is not a folder", file=sys.stderr)
        raise SystemExit(2)
    paths = write_report(args.root, args.out)
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
             "report/ppl_vs_sparsity": wandb.Image(str(paths["plot"]))})
    run.finish()


if __name__ == "__main__":
    main()
