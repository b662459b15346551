"""What sparsity buys on SmolLM2-135M under the CPU protocol: decode and prefill speed with the
dense kernel and the sparse kernel side by side in one run, beside the memory-bandwidth floor,
and the bytes of each stored form (evaluation/speed.py, formats.py).

    python scripts/bench_speed.py                      # magnitude at 0.5, 0.7, 0.9 and 2:4
    python scripts/bench_speed.py wanda:0.9 --threads 2
    python scripts/bench_speed.py --llama7b-blocks 2   # Llama-2-7B's shapes, random weights
    SPARSEBENCH_BITMASK_PATH=avx2 python scripts/bench_speed.py   # force a bitmask kernel path
    python scripts/bench_speed.py --no-fuse            # q/k/v and gate/up as separate products

--llama7b-blocks N: a Llama with Llama-2-7B's block shapes (hidden 4096, MLP 11008, 32 heads)
and N blocks of random weights, a 1024-token vocabulary so the linears are the model, timed the
same way (magnitude masks of random weights are random masks; no calibration, no data):
decode per block = decode per token / N.

Speed depends on how many weights each matrix keeps and in which pattern, not on which method
chose them, so the table uses magnitude pruning (no calibration pass; any method name works).
Each config starts from the dense weights, is pruned through the library entry point
(pipeline.prune_model, 64 calibration windows of 512 tokens) and measured by
evaluation.speed.measure with the eval.speed defaults (batch 1 and 8, 16 decode tokens,
decode the median of 3 after one warm-up, prefill one forward). Prints one JSON object per
config, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sparsebench import data as datamod
from sparsebench.evaluation.speed import SpeedSpec, measure
from sparsebench.formats import size_of
from sparsebench.models import ModelSpec, load_model, prunable_linears
from sparsebench.pipeline import prune_model
from sparsebench.records.tracking import kernel_environment

CONF = Path(__file__).resolve().parent.parent / "conf"
TABLE = ["magnitude:0.5", "magnitude:0.7", "magnitude:0.9", "magnitude:2:4"]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("configs", nargs="*", default=TABLE, help="method:sparsity or method:N:M")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--llama7b-blocks", type=int, default=0, help="Llama-2-7B shapes, N blocks")
    ap.add_argument("--kernels", default="", help="comma-separated eval.speed.kernels")
    ap.add_argument(
        "--no-fuse", action="store_true", help="eval.speed.fuse=false: every linear on its own"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.llama7b_blocks:
        model, tok, calib = llama7b_shapes(args.llama7b_blocks), None, None
    else:
        cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "smollm2-135m.yaml"))
        model, tok = load_model(ModelSpec(**{**cfg, "seqlen": args.seqlen}))
        calib = datamod.calibration(
            datamod.DataSpec(nsamples=args.nsamples), tok, args.seqlen, model.config.vocab_size
        )
    kernels = tuple(k for k in args.kernels.split(",") if k)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    print(json.dumps({"environment": kernel_environment()}), flush=True)
    rows = []
    for item in args.configs:
        method, _, rest = item.partition(":")
        pattern = rest if ":" in rest else "unstructured"
        sparsity = 0.5 if ":" in rest else float(rest)
        model.load_state_dict(dense)
        prune_model(
            model,
            tok,
            method=method,
            sparsity=sparsity,
            pattern=pattern,
            calib=calib,
            seqlen=args.seqlen,
        )
        speed = measure(
            model,
            list(prunable_linears(model)),
            args.seqlen,
            torch.device("cpu"),
            pattern,
            SpeedSpec(enabled=True, kernels=kernels, fuse=not args.no_fuse),
        )
        row = {"config": item, "speed": speed, "size": size_of(model)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(markdown(rows))
    return 0


def llama7b_shapes(blocks: int):
    """Random float32 weights in Llama-2-7B's block shapes (init std 0.02, as transformers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=blocks,
        vocab_size=1024,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config).eval()


def markdown(rows) -> str:
    """Two tables: the whole model (decode, prefill, the floor, sizes), then the pruned linears
    alone at 1, 8 and 64 tokens (each kernel's ms; at one token its measured / floor)."""
    lines = [
        "| config | kernels (1 / 8 / 64 rows) | decode ms/token b1 dense / sparse (x) "
        "| b8 dense / sparse (x) | measured / floor b1 dense, sparse | rest of the forward b1 "
        "ms dense, sparse | prefill tok/s b1 dense / sparse (x) | b8 (x) | pruned weights MB: "
        "dense, bitmask, CSR int16, CSR int64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, z = r["speed"], r["size"]["pruned_weights"]
        d, p, x, one = s["dense"], s["sparse"], s["speedup"], s["kernels_one_token"]
        mb = [z[k] / 1e6 for k in ("dense", "bitmask", "csr_int16", "csr_int64")]
        kernels = [s["kernel"], s.get("batch_kernel", s["prefill_kernel"]), s["prefill_kernel"]]
        lines.append(
            f"| {r['config']} | {' / '.join(_named(s, k) for k in kernels)} "
            f"| {d['decode_ms_b1']:.1f} / {p['decode_ms_b1']:.1f} ({x['decode_b1']:.2f}) "
            f"| {d['decode_ms_b8']:.1f} / {p['decode_ms_b8']:.1f} ({x['decode_b8']:.2f}) "
            f"| {d['decode_over_floor_b1']:.1f}, {p['decode_over_floor_b1']:.1f} "
            # the forward less its pruned linears (attention, norms, lm_head, Python), measured
            f"| {d['decode_ms_b1'] - one['dense_ms']:.1f}, "
            f"{p['decode_ms_b1'] - one[s['kernel'] + '_ms']:.1f} "
            f"| {d['prefill_tps_b1']:.0f} / {p['prefill_tps_b1']:.0f} ({x['prefill_b1']:.2f}) "
            f"| ({x['prefill_b8']:.2f}) | {mb[0]:.0f}, {mb[1]:.0f}, {mb[2]:.0f}, {mb[3]:.0f} |"
        )
    lines += [
        "",
        "| config | pruned linears alone, 1 token: ms (measured / floor) | 8 tokens: ms "
        "| 64 tokens: ms |",
        "|---|---|---|---|",
    ]
    for r in rows:
        s = r["speed"]
        lines.append(
            f"| {r['config']} | {_alone(s['kernels_one_token'], True)} "
            f"| {_alone(s.get('kernels_8_tokens', {}), False)} "
            f"| {_alone(s['kernels_64_tokens'], False)} |"
        )
    lines.append("")
    for r in rows:  # the bandwidth the floors divide by, sampled beside the timings (speed.py)
        s = r["speed"]
        low, high = s.get("bandwidth_gbs_range", [s["bandwidth_gbs"]] * 2)
        lines.append(
            f"- {r['config']}: copy bandwidth {s['bandwidth_gbs']:.1f} GB/s "
            f"({low:.1f}-{high:.1f} beside the kernels' timings)"
        )
    return "\n".join(lines)


def _named(speed, kernel: str) -> str:
    path = speed.get(f"{kernel}_path")  # the compiled kernels' path (bitmask, gather)
    masks = speed.get("bitmask_masks") if kernel == "bitmask" else None  # AVX-512, one token
    return f"{kernel} ({path}{', masks ' + masks if masks else ''})" if path else kernel


def _alone(table, floors: bool) -> str:
    """'dense 19.3 (1.6); bitmask 11.0 (1.1); csr16 ...': each kernel's ms (and over floor)."""
    cells = []
    for key, ms in table.items():
        if key.endswith("_ms"):
            k = key.removesuffix("_ms")
            floor = table.get(f"{k}_over_floor")
            cells.append(f"{k} {ms:.1f}" + (f" ({floor:.1f})" if floors and floor else ""))
    return "; ".join(cells)


if __name__ == "__main__":
    sys.exit(main())
