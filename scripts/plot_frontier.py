"""The quantization frontier of docs/results.md from bench_oneshot.py's JSON lines: perplexity
against the bits a stored weight of the pruned linears needs, one line per method, sparsity and
quantizer across bit widths, drawn by the report's own `plot_bits` (records/plots.py).

    python scripts/bench_oneshot.py --windows 16 dense/gptq@bits=4 wanda/gptq@bits=4:0.5 ... \\
        > frontier.jsonl
    python scripts/plot_frontier.py frontier.jsonl --out docs/quant_frontier.png

A line without a quantizer (`wanda`, `sparsegpt`, `dense`) is the float end of its method's
lines: its bits per weight are the float32 kept values and the 1-bit mask, counted as
`quant.bits_of` counts them ((1 - actual sparsity) x 32 + 1; 32 for dense).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def row(i: int, r: dict) -> dict:
    method, _, quant = r["method"].partition(" / ")
    tag = None
    if quant:
        name, _, opts = quant.partition("@")
        kv = dict(o.split("=") for o in opts.split(",") if o)
        tag = f"{name} w{kv.get('bits', 4)}" + (" joint" if kv.get("joint") == "True" else "")
    bits = r.get("bits_per_pruned_weight")
    if bits is None:  # float32 kept values and, with masks, one bit each
        s = r["actual_sparsity"]
        bits = 32.0 if method == "dense" else round((1 - s) * 32 + 1, 4)
    return {
        "status": "complete",
        "model": "smollm2-135m",
        "path": str(i),
        "method": method,
        "label": method + (f" + {tag}" if tag else ""),
        "quant": tag,
        "sparsity": r["sparsity"],
        "pattern": r["pattern"],
        "bits_per_weight": bits,
        "wikitext2": r["wikitext2"],
        "c4": r["c4"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("jsonl", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from sparsebench.records.plots import plot_bits

    lines = [json.loads(x) for f in args.jsonl for x in f.read_text().splitlines() if x.strip()]
    plot_bits([row(i, r) for i, r in enumerate(lines)], args.out)
    print(f"{args.out}: {len(lines)} runs")


if __name__ == "__main__":
    sys.exit(main())
