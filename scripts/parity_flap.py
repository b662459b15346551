"""FLAP beside its authors' released code (CASIA-IVA-Lab/FLAP `prune_flap`) on a model it runs.

The released code is for multi-head Llama with head_dim 128 and biases on o_proj and
down_proj (its own modeling file); the model here is a random Llama of that shape
(hidden 256, 2 heads of 128, zero biases on o_proj and down_proj only, as its modeling file
and loader leave them), in float16 as the released code runs (its bias
compensation multiplies a float16 mean by the weight). Both prune copies of it from the same
random calibration windows; compared per block: the kept rows and columns (every weight
tensor must be the same shape and bit-identical, so the same heads and channels went), the
compensated biases (the largest difference, float16 arithmetic on both sides), and the
logits of both pruned models. The checkout's lib is imported unmodified except where it
cannot run here: `get_loaders` returns the windows, `.cuda()` is the identity, each block
gets the rotary tables transformers 5 needs (scripts/parity_ria_dsnot.py's shims) and the
`num_heads` attribute its modeling file has.

    python scripts/parity_flap.py --flap ../ref/FLAP AL-AM:WIFV:0.2 AL-AM:WIFV:0.5 \\
        UL-UM:WIFV:0.3 AL-AM:IFV:0.3 AL-AM:WIFN:0.3

Prints one JSON line per config (structure:metric:ratio).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parity_ria_dsnot import load_released, rotary_shim  # noqa: E402

from sparsebench.pipeline import prune_model  # noqa: E402
from sparsebench.registry import METHODS  # noqa: E402


def tiny_llama(layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=128,
        attention_bias=True,
        mlp_bias=True,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # the released modeling: zero biases on o_proj and down_proj only
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                if name.endswith(("o_proj", "down_proj")):
                    module.bias.zero_()
                else:
                    module.bias = None
    return model.half().eval()


def released(module, model, calib, structure, metric, ratio) -> None:
    module.get_loaders = lambda *a, **k: (
        [(calib[i : i + 1], None) for i in range(len(calib))],
        None,
    )
    module.print = lambda *a, **k: None
    for layer in model.model.layers:
        rotary_shim(layer, model.model.rotary_emb)
        layer.self_attn.num_heads = model.config.num_attention_heads  # its modeling file's
    model.seqlen, model.hf_device_map = calib.shape[1], {}
    ns = types.SimpleNamespace(
        nsamples=len(calib),
        seed=0,
        pruning_ratio=ratio,
        remove_heads=0,
        metrics=metric,
        structure=structure,
        unstr=False,
    )
    cuda, torch.Tensor.cuda = torch.Tensor.cuda, lambda self, *a, **k: self
    try:
        module.prune_flap(ns, model, None, torch.device("cpu"))
    finally:
        torch.Tensor.cuda = cuda
        for layer in model.model.layers:
            del layer.forward


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--flap", required=True, help="a checkout of CASIA-IVA-Lab/FLAP")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("configs", nargs="*", default=["AL-AM:WIFV:0.2", "AL-AM:WIFV:0.5"])
    args = ap.parse_args()
    module = load_released(args.flap, "flap_released")
    dense = tiny_llama(args.layers)
    calib = torch.randint(
        0, 256, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(1)
    )
    probe = torch.randint(0, 256, (2, args.seqlen), generator=torch.Generator().manual_seed(2))
    for config in args.configs:
        structure, metric, ratio = config.split(":")
        ref, ours = copy.deepcopy(dense), copy.deepcopy(dense)
        released(module, ref, calib, structure, metric, float(ratio))
        pruner = METHODS.build("flap", {"metric": metric, "structure": structure})
        out = prune_model(
            ours, method=pruner, sparsity=float(ratio), calib=calib, seqlen=args.seqlen
        )
        a, b = ref.state_dict(), ours.state_dict()
        shapes = all(a[k].shape == b[k].shape for k in a)
        weights = shapes and all(torch.equal(a[k], b[k]) for k in a if not k.endswith(".bias"))
        bias = max(
            float((a[k].float() - b[k].float()).abs().max()) for k in a if k.endswith(".bias")
        )
        scale = max(float(a[k].float().abs().max()) for k in a if k.endswith(".bias"))
        with torch.no_grad():
            la, lb = ref(probe).logits.float(), ours(probe).logits.float()
        line = {
            "config": config,
            "widths": out.method_report["widths"],
            "same_shapes": shapes,
            "weights_identical": weights,
            "bias_max_abs_diff": bias,
            "bias_max_abs": scale,
            "logits_max_abs_diff": float((la - lb).abs().max()),
            "removed_share": out.method_report["removed_share"],
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())
