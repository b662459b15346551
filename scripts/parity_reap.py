"""REAP beside llm-compressor's `REAPPruningModifier` (installed outside the repository).

llm-compressor is not a sparsebench dependency: pass the folder it is unpacked in
(`pip download llmcompressor==0.14.0 --no-deps` and unzip the wheel, or any folder that
imports it). Both start from the same random tiny mixture of experts (sparsebench's tiny-<family>
config, seed 0) and the same calibration token ids; llm-compressor runs its sequential
pipeline with REAP at the fraction of experts that removes the same count per layer as
sparsebench's share of the blocks' weights. Compared per MoE layer: the experts kept
(llm-compressor's `report_path` against sparsebench's `kept_experts`), then the two pruned
models' logits on held-out ids.

    python scripts/parity_reap.py --llmcompressor /tmp/llmc mixtral:0.25 qwen3-moe:0.5 \\
        olmoe:0.25

Prints one JSON line per family:fraction.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent


def hf_tiny(family: str):
    """The tiny config's model as transformers builds it (fused experts), and its spec."""
    from transformers import AutoModelForCausalLM

    from sparsebench.models import ModelSpec, load_config

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"tiny-{family}.yaml"))
    spec = ModelSpec(**cfg["model"])
    torch.manual_seed(0)  # as sparsebench's load_model builds a tiny model
    return AutoModelForCausalLM.from_config(load_config(spec), dtype=torch.float32).eval()


def llmcompressor_run(model, calib, fraction: float, report: Path):
    """llm-compressor's oneshot on a saved copy of `model` (it reads the folder's config);
    the pruned model it returns."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier

    # the windows as they are, one per batch, in order (a DataLoader is used untouched)
    windows = [{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in calib]
    data = torch.utils.data.DataLoader(windows, batch_size=None)
    from sparsebench.models import byte_tokenizer

    folder = report.parent / "dense"
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return oneshot(
        model=str(folder),
        processor=byte_tokenizer(),
        dataset=data,
        recipe=[REAPPruningModifier(sparsity=fraction, report_path=str(report))],
        num_calibration_samples=len(calib),
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
        pipeline="sequential",
        moe_calibrate_all_experts=False,
    )


def drops(model, share: float) -> int:
    from sparsebench.errors import SparsebenchError
    from sparsebench.pruners.reap import experts_to_drop

    try:
        return experts_to_drop(model, share)[0]
    except SparsebenchError:  # none, or too many
        return -1


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--llmcompressor", required=True, help="a folder that imports llmcompressor")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("configs", nargs="*", default=["mixtral:0.25", "qwen3-moe:0.5", "olmoe:0.25"])
    args = ap.parse_args()
    sys.path.insert(0, args.llmcompressor)

    from sparsebench.families import adapt
    from sparsebench.pipeline import prune_model

    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 256, (args.nsamples, args.seqlen), generator=gen)
    probe = torch.randint(0, 256, (2, args.seqlen), generator=gen)
    for config in args.configs:
        family, fraction = config.split(":")
        dense = hf_tiny(family)
        report = Path(tempfile.mkdtemp()) / "retained.json"
        ref = llmcompressor_run(dense, calib, float(fraction), report).eval()
        retained = json.loads(report.read_text())
        ours = adapt(copy.deepcopy(dense))
        count = ours.config.num_local_experts
        drop = int(count * float(fraction))
        # the share of the blocks' weights that removes `drop` experts per layer
        share = next(s / 1000 for s in range(1, 1000) if drops(ours, s / 1000) == drop)
        out = prune_model(ours, method="reap", sparsity=share, calib=calib, seqlen=args.seqlen)
        kept = out.method_report["kept_experts"]
        ref_kept = [
            retained[k]
            for k in sorted(retained, key=lambda k: [int(p) for p in k.split(".") if p.isdigit()])
        ]
        ours_kept = [kept[k] for k in sorted(kept, key=int)]
        with torch.no_grad():
            diff = float((ref(probe).logits - ours(probe).logits).abs().max())
        line = {
            "config": config,
            "share": share,
            "experts_removed_per_layer": drop,
            "kept_llmcompressor": ref_kept,
            "kept_sparsebench": ours_kept,
            "same_experts": ref_kept == ours_kept,
            "logits_max_abs_diff": diff,
            "saliency": out.method_report["scores"],
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())
