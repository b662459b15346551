"""sparsebench's Wanda and SparseGPT side by side with the papers' per-layer loop.

The official code (locuslab/wanda `lib/prune.py`: prune_wanda, prune_sparsegpt with
IST-DASLab's SparseGPT class) does not run on transformers 5 as published: its Catcher
keeps only attention_mask and position_ids, and Llama blocks now need
position_embeddings. So this script re-implements that loop, written here from the
published algorithm and the official loop's structure, and keeps what decides its
cost and its numbers:

- one statistic per linear (7 hooks per Llama block; sparsebench shares q/k/v and
  gate/up, 4 statistics), each SparseGPT linear inverts its own Hessian;
- the official accumulation (running means; H built as sqrt(2/n) X scaled products);
- the official tie rules: Wanda prunes the first int(cols*s) of a stable per-row sort;
  SparseGPT prunes every weight whose score is <= the k-th smallest of its 128-column
  block (k+1 or more per block, so its sparsity is a hair above the target; sparsebench's
  default count=official does the same, count=exact prunes k);
- N:M as the official column loop (topk of each M-group as the sweep reaches it);
- every window runs alone through the block, before and after pruning (sparsebench too,
  unless `--calib-batch B` runs its B windows per forward).

The one change: block inputs and keyword arguments come from sparsebench's capture(),
which records what transformers passes to each block (the official Catcher's role).

    python scripts/bench_reference.py                      # wanda:0.5 sparsegpt:0.5
    python scripts/bench_reference.py wanda:2:4 sparsegpt:0.7
    python scripts/bench_reference.py sparsegpt:0.5 --option count=exact --repeats 1

For each config it prunes the dense model with the reference loop and with sparsebench
in the same process, each from the dense weights, `--repeats` times each in ABBA order
(repeats must reproduce the first run's masks), then evaluates the first run of each, and
prints one JSON line per implementation (impl, method, sparsity, pattern, options,
wikitext2, c4, actual_sparsity, prune_seconds per run and their mean), then one with
the ratios and the fraction of weights whose pruned/kept state agrees.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_oneshot import add_protocol_args, evaluate, load_protocol, parse  # noqa: E402

from sparsebench.engine.driver import block_out, capture, to_device  # noqa: E402
from sparsebench.engine.training import sync_cuda  # noqa: E402
from sparsebench.models import find_blocks, find_linears, prunable_linears  # noqa: E402
from sparsebench.pipeline import prune_model  # noqa: E402
from sparsebench.registry import METHODS  # noqa: E402


class RefWanda:
    """Per-linear squared input norms, pruned per row by a stable sort."""

    def __init__(self, linear):
        self.linear = linear
        self.scaler_row = torch.zeros(linear.in_features, device=linear.weight.device)
        self.n = 0

    def add_batch(self, inp):
        batch = inp.shape[0]
        x = inp.reshape(-1, inp.shape[-1]).t().float()
        self.scaler_row *= self.n / (self.n + batch)
        self.n += batch
        self.scaler_row += torch.norm(x, p=2, dim=1) ** 2 / self.n

    def prune(self, sparsity, n, m):
        W = self.linear.weight.data
        metric = W.abs() * torch.sqrt(self.scaler_row.reshape(1, -1))
        prune = torch.zeros_like(metric, dtype=torch.bool)
        if n:
            for c in range(0, metric.shape[1], m):
                prune.scatter_(
                    1, c + torch.topk(metric[:, c : c + m], m - n, dim=1, largest=False)[1], True
                )
        else:
            order = torch.sort(metric, dim=-1, stable=True)[1]
            prune.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], True)
        W[prune] = 0


class RefSparseGPT:
    """Per-linear Hessian; the OBS sweep of the SparseGPT paper, blocks of 128 columns."""

    def __init__(self, linear):
        self.linear = linear
        self.H = torch.zeros(linear.in_features, linear.in_features, device=linear.weight.device)
        self.n = 0

    def add_batch(self, inp):
        batch = inp.shape[0]
        x = inp.reshape(-1, inp.shape[-1]).t()
        self.H *= self.n / (self.n + batch)
        self.n += batch
        x = math.sqrt(2 / self.n) * x.float()
        self.H += x @ x.t()

    def prune(self, sparsity, n, m, blocksize=128, percdamp=0.01):
        W = self.linear.weight.data.clone().float()
        H, self.H = self.H, None
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        cols = W.shape[1]
        for c1 in range(0, cols, blocksize):
            c2 = min(c1 + blocksize, cols)
            W1, Hinv1 = W[:, c1:c2].clone(), Hinv[c1:c2, c1:c2]
            Q1, E1 = torch.zeros_like(W1), torch.zeros_like(W1)
            d = torch.diag(Hinv1)
            if n:
                cut = torch.zeros_like(W1, dtype=torch.bool)
            else:
                score = W1**2 / d.reshape(1, -1) ** 2
                cut = score <= torch.sort(score.flatten())[0][int(score.numel() * sparsity)]
            for j in range(c2 - c1):
                if n and j % m == 0:
                    score = W1[:, j : j + m] ** 2 / d[j : j + m].reshape(1, -1) ** 2
                    cut.scatter_(1, j + torch.topk(score, m - n, dim=1, largest=False)[1], True)
                w = W1[:, j]
                q = w.clone()
                q[cut[:, j]] = 0
                Q1[:, j] = q
                e = (w - q) / Hinv1[j, j]
                W1[:, j:] -= e.unsqueeze(1) @ Hinv1[j, j:].unsqueeze(0)
                E1[:, j] = e
            W[:, c1:c2] = Q1
            W[:, c2:] -= E1 @ Hinv[c1:c2, c2:]
        self.linear.weight.data = W.to(self.linear.weight.dtype)


REFERENCE = {"wanda": RefWanda, "sparsegpt": RefSparseGPT}


@torch.no_grad()
def reference_prune(model, calib, method, sparsity, pattern, device):
    _, blocks = find_blocks(model)
    inps, block_args = capture(model, calib, device)
    outs = torch.zeros_like(inps)
    n, m = (pattern.n, pattern.m) if pattern.is_nm else (0, 0)
    for i, block in enumerate(blocks):
        block.to(device)
        args, kwargs = to_device(block_args[i], device)
        subset = find_linears(block)
        wrapped = {name: REFERENCE[method](lin) for name, lin in subset.items()}
        handles = [
            lin.register_forward_hook(lambda mod, a, o, w=wrapped[name]: w.add_batch(a[0].data))
            for name, lin in subset.items()
        ]
        for j in range(inps.shape[0]):
            outs[j] = block_out(block(inps[j].unsqueeze(0), *args, **kwargs))[0]
        for h in handles:
            h.remove()
        for w in wrapped.values():
            w.prune(sparsity, n, m)
        for j in range(inps.shape[0]):
            outs[j] = block_out(block(inps[j].unsqueeze(0), *args, **kwargs))[0]
        inps, outs = outs, inps


def zero_masks(model) -> dict[str, torch.Tensor]:
    # on the CPU: the reference loop leaves its blocks on the compute device, sparsebench does not
    return {name: (lin.weight.detach() == 0).cpu() for name, lin in prunable_linears(model).items()}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "configs",
        nargs="*",
        default=["wanda:0.5", "sparsegpt:0.5"],
        help="method:sparsity or method:N:M, method in {wanda, sparsegpt}",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="prune runs per implementation, in ABBA order; the time is their mean",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="untimed prune runs per implementation before the timed ones (use 1 on a GPU: "
        "the first run pays CUDA context, cuBLAS and allocator start-up)",
    )
    ap.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a sparsebench method option, e.g. count=exact for SparseGPT",
    )
    add_protocol_args(ap)
    args = ap.parse_args()
    if args.repeats < 1 or args.warmup < 0 or any("=" not in o for o in args.option):
        sys.exit(
            "bench_reference: --repeats must be >= 1, --warmup >= 0 and each --option KEY=VALUE"
        )
    configs = [parse(c) for c in args.configs]
    for name, _, _ in configs:
        if name not in REFERENCE:
            sys.exit(
                f"bench_reference: no reference loop for {name!r}; choose from {sorted(REFERENCE)}"
            )

    device = torch.device(args.device)
    model, calib, streams = load_protocol(args)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    options = {k: yaml.safe_load(v) for k, v in (opt.split("=", 1) for opt in args.option)}

    peaks = {}

    def prune(impl, method, sparsity, pattern):
        model.load_state_dict(dense)
        model.to("cpu")
        sync_cuda()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        if impl == "reference":
            start = time.perf_counter()
            reference_prune(model, calib, method, sparsity, pattern, device)
            sync_cuda()
            took = time.perf_counter() - start
        # the library entry point; its prune stage is timed as the reference's loop (synchronised)
        else:
            took = prune_model(
                model,
                method=METHODS.build(method, options),
                sparsity=sparsity,
                pattern=pattern,
                calib=calib,
                seqlen=calib.shape[1],
                device=device,
                calib_batch=args.calib_batch,
            ).timings_s["prune"]
        if device.type == "cuda":
            peaks[impl] = max(peaks.get(impl, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
        return took

    # Timing order ABBA... (reference, sparsebench, sparsebench, reference, ...): a drift in
    # the machine's speed over the run (other load, memory, clocks) hits both sides alike.
    # Nothing but pruning runs between the timed runs: each implementation's first pruned
    # weights are kept and evaluated after the last timed run. (Evaluating in between put an
    # evaluation right before sparsebench's first run and before none of the reference's.)
    order = [("reference", "sparsebench"), ("sparsebench", "reference")]
    for method, sparsity, pattern in configs:
        rows, zeros, pruned, times = {}, {}, {}, {"reference": [], "sparsebench": []}
        for _ in range(args.warmup):
            for impl in order[0]:
                prune(impl, method, sparsity, pattern)
        for rep in range(args.repeats):
            for impl in order[rep % 2]:
                times[impl].append(prune(impl, method, sparsity, pattern))
                z = zero_masks(model)
                if impl in zeros:  # a repeat: it must reproduce the first run's masks
                    if any(not torch.equal(z[k], zeros[impl][k]) for k in z):
                        sys.exit(
                            f"bench_reference: {impl} {method} is not deterministic across repeats"
                        )
                    continue
                zeros[impl] = z
                pruned[impl] = {k: v.clone() for k, v in model.state_dict().items()}
        for impl in ("reference", "sparsebench"):
            model.load_state_dict(pruned.pop(impl))
            z = zeros[impl]
            total = sum(m.numel() for m in z.values())
            ppl = evaluate(model, streams, args)
            rows[impl] = {
                "impl": impl,
                "method": method,
                "sparsity": sparsity,
                "pattern": str(pattern),
                "options": (
                    {**options, "calib_batch": args.calib_batch}
                    if args.calib_batch > 1
                    else options
                )
                if impl == "sparsebench"
                else {},
                "wikitext2": None if math.isnan(ppl["wikitext2"]) else round(ppl["wikitext2"], 4),
                "c4": None if math.isnan(ppl["c4"]) else round(ppl["c4"], 4),
                "peak_gpu_gib": round(peaks[impl], 3) if impl in peaks else None,
                "actual_sparsity": round(sum(int(m.sum()) for m in z.values()) / total, 6),
            }
        for impl in rows:
            rows[impl]["prune_seconds"] = [round(t, 2) for t in times[impl]]
            rows[impl]["prune_seconds_mean"] = round(sum(times[impl]) / len(times[impl]), 2)
            print(json.dumps(rows[impl]), flush=True)
        ref, ours = rows["reference"], rows["sparsebench"]
        same = sum(
            int((zeros["reference"][k] == zeros["sparsebench"][k]).sum())
            for k in zeros["reference"]
        )
        print(
            json.dumps(
                {
                    "compare": f"{method}:{pattern}" + ("" if pattern.is_nm else f":{sparsity}"),
                    "wikitext2_rel_diff": round(ours["wikitext2"] / ref["wikitext2"] - 1, 5)
                    if ref["wikitext2"]
                    else None,
                    "c4_rel_diff": round(ours["c4"] / ref["c4"] - 1, 5) if ref["c4"] else None,
                    "prune_time_ratio_sparsebench_over_reference": round(
                        ours["prune_seconds_mean"] / ref["prune_seconds_mean"], 3
                    ),
                    "mask_agreement": round(same / total, 6),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
