"""`sparsebench-report <sweep dir>`: every results.json below it -> Markdown + CSV table + PNG
plots.

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
the number of non-zero parameters (the Elsa paper's Figure 3 view), log-log; with
quantized rows report_bits.png (perplexity against bits per weight); with eval.speed rows
report_speed.png (decode speed-up against sparsity) and report_tradeoff.png (perplexity
against the measured decode speed-up, one point per row: structured runs as triangles beside
the unstructured and N:M runs with their best sparse kernel).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from .plots import (
    not_plotted,
    plot,
    plot_allocation,
    plot_bits,
    plot_nonzero,
    plot_speed,
    plot_tradeoff,
)
from .rows import fold_text, load_results, table, zeroshot_tasks


def _fmt(v, digits=2):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ppl(r: dict[str, Any], k: str) -> str:
    """A perplexity cell; (warning): the method doubts its own result (listed below)."""
    mark = " (warning)" if r.get("warnings") and r.get(k) is not None else ""
    if r.get("n", 1) > 1 and r.get(f"{k}_std") is not None:
        return f"{r[k]:.2f} ± {r[f'{k}_std']:.2f} ({fold_text(r)}){mark}"
    return _fmt(r[k]) + mark


def _folded(r: dict[str, Any], k: str, digits: int = 2) -> str:
    """A speed or size cell: mean ± std over the runs folded (their n is in the perplexity
    cells), marked when any run's speed measurement was suspect."""
    if r.get(k) is None:
        return "—"
    cell = _fmt(r[k], digits)
    if r.get("n", 1) > 1 and r.get(f"{k}_std") is not None:
        cell += f" ± {r[f'{k}_std']:.{digits}f}"
    if k.endswith("_speedup") and r.get("speed_suspect"):
        cell += " (suspect)"
    return cell


def _tokens(v) -> str:
    return "—" if v is None else f"{int(v):,}"


def _columns(rows: list[dict[str, Any]], tasks: list[str], spread: bool) -> list[tuple[str, Any]]:
    """(heading, cell function) of every column that says something for these rows: a column
    empty (or zero) for every row is left out (one-shot rows train nothing; their wall time
    is their prune time)."""

    def has(key, zero_is_empty=True):
        return any(
            r.get(key) not in (None, 0, 0.0) if zero_is_empty else r.get(key) is not None
            for r in rows
        )

    cols = [
        ("model", lambda r: r["model"]),
        ("method", lambda r: r["label"]),
        ("sparsity", lambda r: _fmt(r["sparsity"])),
        ("actual", lambda r: _fmt(r["actual_sparsity"], 4)),
        ("pattern", lambda r: r["pattern"]),
        ("WikiText-2", lambda r: _ppl(r, "wikitext2")),
        ("C4", lambda r: _ppl(r, "c4")),
        ("% dense (Wiki)", lambda r: _fmt(r["wikitext2_dense_retained_pct"], 1)),
        ("% dense (C4)", lambda r: _fmt(r["c4_dense_retained_pct"], 1)),
    ]
    cols = [c for c in cols if c[0] not in ("C4", "% dense (C4)") or has("c4")]
    if tasks:
        cols += [(t, (lambda r, t=t: _fmt(r[t], 4))) for t in tasks]
        cols += [
            ("mean acc", lambda r: _fmt(r["mean_acc"], 4)),
            ("% dense (acc)", lambda r: _fmt(r["mean_acc_dense_retained_pct"], 1)),
        ]
    if has("train_tokens"):
        cols += [
            ("train tokens", lambda r: _tokens(r["train_tokens"])),
            ("steps", lambda r: _tokens(r["steps"])),
        ]
    if any(r.get("quant") for r in rows):  # quantized rows: what a stored weight costs
        cols.append(("bits / weight", lambda r: _fmt(r.get("bits_per_weight"), 2)))
    cols.append(("prune s", lambda r: _fmt(r["prune_s"], 1)))
    if any(
        r.get("wall_s") is not None
        and r.get("prune_s") is not None
        and abs(r["wall_s"] - r["prune_s"]) > 0.05
        for r in rows
    ):
        cols.append(("wall s", lambda r: _fmt(r["wall_s"], 1)))
    if has("decode_speedup"):
        cols += [
            ("decode x", lambda r: _folded(r, "decode_speedup")),
            ("prefill x", lambda r: _folded(r, "prefill_speedup")),
        ]
    if has("bitmask_mb"):
        cols.append(("MB (bitmask)", lambda r: _folded(r, "bitmask_mb", 1)))
    cols += [
        ("peak GiB", lambda r: _fmt(r["peak_gib"])),
        (
            "status",
            lambda r: (
                r["status"]
                if r["status"] == "complete" or not r.get("error")
                else f"{r['status']}: {_cell(r['error'])}"
            ),
        ),
    ]
    if spread:
        cols.append(
            ("within spread of", lambda r: ", ".join(r.get("within_spread_of") or []) or "—")
        )
    return cols


COLUMN_NOTES = {
    "sparsity": "the target sparsity (N:M: 0.50)",
    "actual": "the measured fraction of zeros over every pruned linear; it differs from the "
    "target only as each method's count rule says (listed below the columns)",
    "WikiText-2": "perplexity, exp(mean window NLL) over the protocol's windows; lower is better; "
    "mean ± std over the runs folded: n seeds (runs that differ only in the seed), or n "
    "repeats of one seed (the same config run again: a timing's spread, not a seed's)",
    "C4": "perplexity on the C4 eval stream, as WikiText-2",
    "% dense (Wiki)": "dense perplexity / row perplexity x 100, against the dense run of the row's "
    "own protocol: "
    "100 for dense, higher is better",
    "% dense (C4)": "as % dense (Wiki), on C4",
    "mean acc": "mean of the zero-shot tasks' headline accuracies; % dense (acc): row / dense x "
    "100",
    "train tokens": "tokens seen by optimizer steps over every stage (block-wise methods: summed "
    "over blocks)",
    "steps": "optimizer steps over every stage",
    "bits / weight": "bits a stored weight of the pruned linears needs: kept values at the "
    "quantized width (or the float width), the 1-bit mask, scales and zero points "
    "(results.json size.bits)",
    "prune s": "seconds of calibration, allocation and pruning",
    "wall s": "seconds of the training stages",
    "peak GiB": "peak memory of the run's process (GPU peak on CUDA)",
    "decode x": "decode speed-up over the dense kernel, one sequence, KV cache, the same run "
    "(eval.speed; the kernel and the bandwidth floor are in results.json speed); mean ± std "
    "over the runs folded; (suspect): a run measured more than its kernel alone or the "
    "bandwidth floor allows, or a model too small to time (listed below)",
    "prefill x": "prefill throughput of the sparse kernel over the dense one, batch 1, as decode x",
    "MB (bitmask)": "the model stored with its pruned weights as kept values + a 1-bit mask "
    "(save.format=bitmask)",
    "within spread of": "rows whose mean lies within the two rows' seed spread (same model, "
    "protocol, sparsity, "
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
            key = (
                r["model"],
                r.get("protocol_name"),
                r.get("seqlen"),
                r.get("calib_windows"),
                r.get("eval_windows"),
            )
            seen[key] = seen.get(key, 0) + 1
    for (model, name, seqlen, calib, evals), n in sorted(seen.items(), key=str):
        lines.append(
            f"- {model}, protocol {name or '?'}: seqlen {seqlen}, {calib if calib else 'no'} "
            "calibration "
            f"windows, {evals if evals else '?'} evaluation windows per dataset ({n} rows)"
        )
    return lines + [""] if seen else lines


def notes(rows: list[dict[str, Any]], tasks: list[str], spread: bool) -> str:
    heads = [h for h, _ in _columns(rows, tasks, spread)]
    lines = ["", "Columns:"] + [f"- {h}: {COLUMN_NOTES[h]}" for h in heads if h in COLUMN_NOTES]
    rules = {  # one line per method as configured (variants of one method share its rule)
        f"{r.get('sort_label') or r['label']}, {r['pattern']}": r["count_rule"]
        for r in rows
        if r.get("count_rule")
    }
    if rules:
        lines += ["", "Count rules (how actual sparsity may differ from the target):"]
        lines += [f"- {what}: {rule}" for what, rule in rules.items()]
    warned = [r for r in rows if r.get("warnings")]
    if warned:
        lines += ["", "Warnings of the methods about their own results (results.json "
                  "method_report.warnings):"]  # fmt: skip
        for r in warned:
            lines += [f"- {r['label']} at {_fmt(r['sparsity'])} {r['pattern']}: "]
            lines[-1] += "; ".join(r["warnings"])
    suspect = [r for r in rows if r.get("speed_suspect")]
    if suspect:
        lines += ["", "Suspect speed measurements (results.json speed.suspect):"]
        for r in suspect:
            runs = r.get("speed_suspect_runs", 1)
            of = f" ({runs} of {r['n']} runs)" if r.get("n", 1) > 1 else ""
            lines += [f"- {r['label']} at {_fmt(r['sparsity'])} {r['pattern']}{of}: "]
            lines[-1] += "; ".join(r["speed_suspect"])
    missing = not_plotted(rows)
    if missing:
        lines += ["", "Rows not in the perplexity plots:"]
        lines += [f"- {r['label']} ({r['model']}, {r['path']}): {why}" for r, why in missing]
    return "\n".join(lines) + "\n"


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
    return (
        "\n".join(header(rows, root) + lines)
        + "\n"
        + notes(rows, tasks, spread)
        + versions_note(rows)
    )


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
        lines += [
            "",
            "Versions:"
            if len(seen) == 1
            else "Versions (rows ran with different code or packages):",
        ]
        for sig, n in seen.items():
            lines.append(
                f"- {', '.join(f'{k} {v}' for k, v in sig)}"
                + ("" if len(seen) == 1 else f" ({n} rows)")
            )
    envs = sorted({r["kernels"] for r in rows if r.get("kernels")})
    if len(envs) == 1:
        lines += ["", f"Kernel environment: {envs[0]}."]
    elif envs:
        lines += [
            "",
            "Kernel environments (rows are labelled [env N]; the last bits of every reduction "
            "differ between",
            "them, and a chaotic row, such as SparseGPT at 0.7 and above, can move by more than "
            "its seed spread;",
            "compare rows within one environment):",
        ]
        lines += [
            f"- env {i}: {e} ({sum(r.get('kernels') == e for r in rows)} rows)"
            for i, e in enumerate(envs, 1)
        ]
    return "\n".join(lines) + "\n" if lines else ""


def write_report(root: Path, out: Path | None = None, by_tokens: bool = False) -> dict[str, Path]:
    out = Path(out or root)
    rows = table(load_results(root))
    if not rows:
        raise SystemExit(f"sparsebench-report: no results.json under {root}")
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / "report.md",
        "csv": out / "report.csv",
        "plot": out / "report.png",
        "plot_nonzero": out / "report_nonzero.png",
    }
    paths["markdown"].write_text(markdown(rows, by_tokens, root))
    fields = list(
        dict.fromkeys(k for r in rows for k in r if k != "ident")
    )  # the label says what differs
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    **r,
                    "versions": json.dumps(r.get("versions") or {}, sort_keys=True),
                    "seeds": " ".join(r.get("seeds") or []),
                    "within_spread_of": " ".join(r.get("within_spread_of") or []),
                    "speed_suspect": "; ".join(r.get("speed_suspect") or []),
                    "repeats": " ".join(f"{k}x{v}" for k, v in (r.get("repeats") or {}).items()),
                }
            )
    plot(rows, paths["plot"])
    plot_nonzero(rows, paths["plot_nonzero"])
    if any(r.get("quant") for r in rows):  # the frontier: perplexity against bits per weight
        paths["plot_bits"] = out / "report_bits.png"
        plot_bits(rows, paths["plot_bits"])
    if any(r.get("block_targets") for r in rows):  # OWL's and EvoPress's per-block targets
        paths["plot_allocation"] = out / "report_allocation.png"
        plot_allocation(rows, paths["plot_allocation"])
    if any(r.get("decode_speedup") for r in rows):  # eval.speed ran for some rows
        paths["plot_speed"] = out / "report_speed.png"
        plot_speed(rows, paths["plot_speed"])
        paths["plot_tradeoff"] = out / "report_tradeoff.png"  # perplexity against speed-up
        plot_tradeoff(rows, paths["plot_tradeoff"])
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="sparsebench-report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "root", type=Path, help="a sweep folder (or any folder with results.json files below it)"
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="where report.md/.csv/.png go (default: root)"
    )
    ap.add_argument(
        "--by-tokens", action="store_true", help="group the table's rows by training tokens"
    )
    ap.add_argument(
        "--wandb",
        choices=["online", "offline"],
        default=None,
        help="also log the table and the plot to a wandb run (group: the sweep folder's name)",
    )
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
    run = wandb.init(
        mode=mode,
        project=project,
        group=Path(root).resolve().name,
        job_type="report",
        name=f"report-{Path(root).resolve().name}",
        dir=str(paths["csv"].parent),
    )
    run.log(
        {
            "report/table": wandb.Table(columns=rows[0], data=rows[1:]),
            "report/ppl_vs_sparsity": wandb.Image(str(paths["plot"])),
            "report/ppl_vs_nonzero": wandb.Image(str(paths["plot_nonzero"])),
        }
    )
    run.finish()


if __name__ == "__main__":
    main()
