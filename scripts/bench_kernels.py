"""One pruned matrix through each CPU kernel, side by side in one process: the dense product
(`F.linear`), the compiled expand (`bitmask`) and index-gather (`gather`) kernels on each path
this CPU has, and csr16's numba loops, at a few token counts. Where bench_speed.py times a whole
model, this isolates one shape, to say which form wins where and why (docs/speed.md).

    python scripts/bench_kernels.py                                 # SmolLM2's MLP shape
    python scripts/bench_kernels.py --shape 11008x4096 --repeats 30  # Llama-2-7B's MLP shape
    python scripts/bench_kernels.py --paths avx2 --sparsity 0.5 0.7 0.9

Random weights and random masks at each sparsity (a mask's pattern, not its method, sets the
speed); microseconds, the median of --repeats calls after one warm-up; the threads are
torch's (--threads). One matrix called again and again stays in the last-level cache when it
fits there (SmolLM2's shapes do): these are cache figures, the memory's are bench_speed.py's,
or --copies N: N different matrices of each shape, called in turn (microseconds a matrix), so
that N x the matrix's bytes beyond the last-level cache streams from memory:

    python scripts/bench_kernels.py --shape 1536x576 576x1536 --copies 300 --repeats 7 --no-csr16
Prints one JSON object per (shape, sparsity, tokens), then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from sparsebench import native
from sparsebench.evaluation.kernels import sparse_form
from sparsebench.evaluation.timing import median_s


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", nargs="+", default=["1536x576"], help="OUTxIN, one or more")
    ap.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--paths", nargs="+", default=None, help="compiled paths (default: all here)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--no-csr16", action="store_true", help="leave numba's csr16 out")
    ap.add_argument("--copies", type=int, default=1, help="matrices of each shape, in turn")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    why = native.why_unavailable()
    if why:
        print(f"the compiled kernels are unavailable: {why}", file=sys.stderr)
        return 2
    paths = args.paths or native.supported()
    torch.manual_seed(0)
    rows = []
    for shape in args.shape:
        out, inp = (int(v) for v in shape.lower().split("x"))
        for sparsity in args.sparsity:
            ws = [torch.randn(out, inp) * (torch.rand(out, inp) >= sparsity)
                  for _ in range(args.copies)]  # fmt: skip
            layouts = {
                k: [native.layout_of_weight(w, torch.float32, k) for w in ws]
                for k in ("bitmask", "gather")
            }
            csr16 = None if args.no_csr16 else [sparse_form(w, "csr16") for w in ws]
            per = lambda fn: 1e6 * median_s(fn, args.repeats, 1) / args.copies  # noqa: E731
            for tokens in args.tokens:
                x = torch.randn(tokens, inp)
                row = {"shape": shape, "sparsity": sparsity, "tokens": tokens,
                       "threads": torch.get_num_threads(), "copies": args.copies,
                       "dense_us": per(lambda: [F.linear(x, w) for w in ws])}  # fmt: skip
                for kernel, each in layouts.items():
                    op = native.operator(kernel)
                    for path in paths:
                        pid = native.PATHS[path]
                        row[f"{kernel}_{path}_us"] = per(
                            lambda op=op, pid=pid, each=each: [op(x, *la, inp, pid) for la in each]
                        )
                if csr16 is not None:
                    row["csr16_us"] = per(lambda: [f(x) for f in csr16])
                rows.append(row)
                print(json.dumps({k: round(v, 1) if isinstance(v, float) else v
                                  for k, v in row.items()}), flush=True)  # fmt: skip
    keys = [k for k in rows[0] if k.endswith("_us")]
    print()
    print("| shape | sparsity | tokens | " + " | ".join(k.removesuffix("_us") for k in keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for r in rows:
        cells = " | ".join(f"{r[k]:.0f}" for k in keys)
        print(f"| {r['shape']} | {r['sparsity']} | {r['tokens']} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
