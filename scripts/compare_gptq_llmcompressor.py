"""GPTQ after SparseGPT: sparsebench's (the mask kept) beside llm-compressor 0.14's GPTQModifier
(installed outside the repository) on the same pruned model, windows and grid.

llm-compressor is not a sparsebench dependency: pass the folder it is unpacked in (as
scripts/parity_reap.py). One tiny random model (sparsebench's tiny-<family> config, seed 0)
is pruned by SparseGPT at 0.5 once; both quantize copies of it with GPTQ at `--bits`, one
asymmetric grid per output row (llm-compressor's `strategy: channel`, sparsebench's
`quant.group_size=-1`, the released GPTQ default), from the same calibration windows.
Measured: the share of the pruned weights that each leaves nonzero (the sparsity that
survives), the bits per weight with and without the mask, and each model's logits against
the unquantized pruned model on held-out ids.

    python scripts/compare_gptq_llmcompressor.py --llmcompressor /tmp/llmc --model tiny-llama

Prints one JSON line.
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


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--llmcompressor", required=True, help="a folder that imports llmcompressor")
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=64)
    args = ap.parse_args()
    sys.path.insert(0, args.llmcompressor)

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    from sparsebench.models import ModelSpec, byte_tokenizer, load_model, prunable_linears
    from sparsebench.pipeline import prune_model, quantize
    from sparsebench.quant import QuantContext
    from sparsebench.specs import build_quant

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{args.model}.yaml"))
    model, _ = load_model(ModelSpec(**cfg["model"]), seed=0)
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    calib = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=gen)
    probe = torch.randint(0, vocab, (2, args.seqlen), generator=gen)
    out = prune_model(model, method="sparsegpt", sparsity=0.5, calib=calib, seqlen=args.seqlen)
    masks = out.masks
    with torch.no_grad():
        pruned_logits = model(probe).logits

    ours = copy.deepcopy(model)
    stage = build_quant({"name": "gptq", "bits": args.bits}, None)
    quantize(stage, QuantContext(ours, masks, torch.device("cpu"), calib))

    folder = Path(tempfile.mkdtemp()) / "pruned"
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    scheme = {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": args.bits, "type": "int", "symmetric": False,
                        "strategy": "channel"},
        }
    }  # fmt: skip
    windows = [{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in calib]
    ref = oneshot(
        model=str(folder),
        processor=byte_tokenizer(),
        dataset=torch.utils.data.DataLoader(windows, batch_size=None),
        recipe=[GPTQModifier(config_groups=scheme, ignore=["lm_head"])],
        num_calibration_samples=len(calib),
        max_seq_length=args.seqlen,
        shuffle_calibration_samples=False,
        pipeline="sequential",
    ).eval()

    def survey(m) -> dict:
        linears = prunable_linears(m)
        pruned = sum(int((~masks[n]).sum()) for n in linears)
        moved = sum(int((lin.weight.detach()[~masks[n]] != 0).sum()) for n, lin in linears.items())
        zeros = sum(int((lin.weight.detach() == 0).sum()) for lin in linears.values())
        total = sum(lin.weight.numel() for lin in linears.values())
        with torch.no_grad():
            err = float((m(probe).logits - pruned_logits).abs().mean())
        return {
            "pruned_weights_left_nonzero": moved,
            "share_of_pruned_left_nonzero": round(moved / pruned, 4),
            "sparsity_after": round(zeros / total, 4),
            "logits_mean_abs_diff_to_pruned": err,
        }

    line = {
        "model": args.model,
        "bits": args.bits,
        "sparsity_before": round(out.sparsity["actual_sparsity"], 4),
        "sparsebench_gptq": survey(ours),
        "llmcompressor_gptq": survey(ref),
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())
