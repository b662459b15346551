"""The structured-against-unstructured table of docs/results.md, from the runs' results.json.

    python scripts/table_structured.py --runs <sweep dir> [<sweep dir> ...] \\
        [--unstructured-speed <bench_speed.py output>]

One row per (method, recovery, sparsity): perplexity, the share actually removed (structured)
or pruned (unstructured), parameters kept (a structured model's own; an unstructured one's
nonzero weights), the bytes one decoded token reads in the stored form a runtime would use
(structured: the smaller dense model; unstructured: the pruned linears as bitmask + values),
and the measured decode / prefill speed-ups over the model before pruning. A structured
run's speed comes from the run itself (eval.speed: the model before the cut against the
smaller one) or, when it did not time it, from another run of the same method and share
(the same cut shapes); an unstructured row's from `scripts/bench_speed.py` at the same
sparsity (magnitude masks: the time depends on the kept count and pattern, not on the method),
through its fastest sparse kernel at each row count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def runs(folders):
    for folder in folders:
        for path in sorted(Path(folder).rglob("results.json")):
            r = json.loads(path.read_text())
            if r.get("status") == "complete":
                yield r


def key(r) -> tuple[str, str, float, str]:
    cfg = r["config"]
    recover = (cfg.get("recover") or {}).get("preset") or (cfg.get("recover") or {}).get("name")
    recover = "" if recover in (None, "none") else recover
    return cfg["method"]["name"], recover, float(cfg["sparsity"]), cfg["model"]["name"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--unstructured-speed", default=None)
    ap.add_argument("--plot", default=None, help="perplexity against decode speed-up (PNG)")
    args = ap.parse_args()
    points = []
    rows, speeds, dense = {}, {}, {}
    for r in runs(args.runs):
        k = key(r)
        full = r.get("metrics", {}).get("wikitext2_windows", 0) > 1  # not a speed-only run
        if k[0] == "dense":
            dense.update({k[3]: r} if full else {})
            continue
        if full:
            rows[k] = r
        if (r.get("speed") or {}).get("speedup"):
            speeds[(CUTS.get(k[0], k[0]), k[2], k[3])] = r["speed"]
    bench = {}
    if args.unstructured_speed:
        for line in Path(args.unstructured_speed).read_text().splitlines():
            row = json.loads(line) if line.startswith("{") else {}  # then the Markdown tables
            if row.get("config", "").count(":") == 1:  # method:sparsity (not N:M)
                bench[float(row["config"].split(":")[1])] = row["speed"]
    print(
        "| model | method (+recovery) | share | actual | WikiText-2 | C4 | params kept (M) "
        "| bytes per token (MB) | decode x b1 | decode x b8 | prefill x b1 | speed from |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, d in sorted(dense.items()):
        m, size = d["metrics"], d["size"]
        print(
            f"| {model} | dense | 0 | 0 | {m['wikitext2']:.2f} | {m['c4']:.2f} "
            f"| {d['model']['params'] / 1e6:.3f} | {size['model_dense'] / 1e6:.2f} "
            "| 1 | 1 | 1 | — |"
        )
    for k in sorted(rows, key=lambda k: (k[3], k[2], k[0] not in STRUCTURED, k[0], k[1])):
        r = rows[k]
        sp, m, size = r["sparsity"], r["metrics"], r["size"]
        structured = "structure" in sp
        params = sp["nonzero_params"] if structured else r["model"]["params"] - sp["pruned_params"]
        nbytes = size["model_dense"] if structured else size["model_bitmask"]
        speed, source = (r.get("speed") or {}), "this run"
        if not speed.get("speedup"):
            speed, source = (
                (speeds.get((CUTS.get(k[0], k[0]), k[2], k[3]), {}), "a run of the same cut shapes")
                if structured
                else (bench.get(k[2], {}), "bench_speed.py, magnitude masks")
            )
        x = speed.get("speedup") or {}
        kernels = "dense (smaller model)" if structured else _kernels(speed)
        fmt = lambda v: f"{v:.2f}" if v else "—"  # noqa: E731
        label = k[0] + (f" + {k[1]}" if k[1] else "")
        if x.get("decode_b1"):
            points.append(
                {
                    "status": "complete",
                    "path": f"{label}:{k[2]}",
                    "model": r["config"]["model"]["name"],
                    "label": label,
                    "method": k[0],
                    "pattern": "structured" if structured else sp["pattern"],
                    "sparsity": k[2],
                    "decode_speedup": x["decode_b1"],
                    "wikitext2": m["wikitext2"],
                    "c4": m["c4"],
                }
            )
        print(
            f"| {k[3]} | {label} | {k[2]} | {sp['actual_sparsity']:.4f} | {m['wikitext2']:.2f} "
            f"| {m['c4']:.2f} | {params / 1e6:.3f} | {nbytes / 1e6:.2f} "
            f"| {fmt(x.get('decode_b1'))} | {fmt(x.get('decode_b8'))} "
            f"| {fmt(x.get('prefill_b1'))} | {source + '; ' + kernels if x else '—'} |"
        )
    if args.plot:  # the report's trade-off figure, one point per row with a speed
        from sparsebench.records.plots import plot_tradeoff

        plot_tradeoff(points, Path(args.plot))
        print(f"\nwrote {args.plot} ({len(points)} points)")
    return 0


STRUCTURED = ("shortgpt", "angular", "flap", "reap", "expert_frequency")
# the same share removes the same number of blocks (so the same shapes) by either rule
CUTS = {"shortgpt": "blocks", "angular": "blocks"}


def _kernels(speed) -> str:
    names = [speed.get("kernel"), speed.get("batch_kernel"), speed.get("prefill_kernel")]
    return " / ".join(n for n in names if n)


if __name__ == "__main__":
    sys.exit(main())
