"""`sparsebench-report <sweep dir>`: every results.json below it -> Markdown + CSV table + PNG plot.

Rows: model x method x sparsity/pattern (dense first); columns: WikiText-2 and C4
perplexity, the dense perplexity relative to each row's (% of dense retained: 100 for
dense, lower is worse), every zero-shot task, their mean and its % of dense, prune
time and peak memory. Runs that did not complete are
listed with their status so nothing is silently dropped. The plot is perplexity
against sparsity per method on a log scale, dense as a horizontal line.
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


def load_results(root: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(Path(root).rglob("results.json")):
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError:
            rec = {"status": "unreadable", "config": {}}
        cfg = rec.get("config", {})
        sp = rec.get("sparsity", {})
        rows.append({
            "path": str(path.parent),
            "status": rec.get("status", "unknown"),
            "model": cfg.get("model", {}).get("name", "?"),
            "method": cfg.get("method", {}).get("name", "?"),
            "sparsity": 0.0 if cfg.get("method", {}).get("name") == "dense" else cfg.get("sparsity"),
            "pattern": sp.get("pattern", cfg.get("pattern", "?")),
            "actual_sparsity": sp.get("actual_sparsity"),
            **{k: rec.get("metrics", {}).get(k) for k in PPL},
            **{t: v["headline"] for t, v in rec.get("zeroshot", {}).get("tasks", {}).items()},
            "mean_acc": rec.get("zeroshot", {}).get("mean_acc"),
            "prune_s": rec.get("timings_s", {}).get("prune"),
            "peak_gib": max(rec.get("memory", {}).values(), default=None),
        })
    return rows


def _key(row):
    return (row["model"], row["method"] != "dense", row["method"], row["pattern"] != "unstructured",
            row["sparsity"] if row["sparsity"] is not None else -1, row["pattern"])


def table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = sorted(rows, key=_key)
    dense = {r["model"]: r for r in rows if r["method"] == "dense" and r["status"] == "complete"}
    tasks = zeroshot_tasks(rows)
    for r in rows:
        d = dense.get(r["model"])
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
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, metric: str = "wikitext2") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    series = defaultdict(list)
    for r in rows:
        if r["status"] == "complete" and r[metric] and r["pattern"] == "unstructured":
            series[(r["model"], r["method"])].append((r["sparsity"], r[metric]))
    for (model, method), pts in sorted(series.items()):
        pts.sort()
        if method == "dense":
            ax.axhline(pts[0][1], color="gray", ls="--", lw=1, label=f"dense ({model})")
        else:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} ({model})")
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
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
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
