"""The memory plan for every model config and method (docs/results.md (history: docs/notes/),
"Scale").

Offline and in seconds: meta-device shapes of each architecture (conf/model/*.yaml `arch`),
GPU placement (device=cuda), the configs' own seqlen (2048) and calibration size (128).
One-shot columns are the device peak of one process; training columns are per rank.

    python scripts/plan_table.py
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from hydra import compose, initialize_config_dir

from sparsebench.launch import Launch
from sparsebench.models import meta_model
from sparsebench.plan import build_plan, knobs_of, shapes_of
from sparsebench.specs import build_specs

MODELS = [
    "opt-1.3b",
    "gemma2-2b",
    "llama2-7b",
    "mistral-7b",
    "qwen2.5-7b",
    "llama3-8b",
    "llama2-13b",
    "gemma2-27b",
    "llama2-70b",
    "llama3.1-8b",
    "qwen3-8b",
    "qwen3-30b-a3b",
    "mixtral-8x7b",
    "llama3.1-70b",
]
CONF = Path(__file__).resolve().parent.parent / "conf"


def specs_for(model: str, method: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"model={model}",
                "model.source=random",
                f"method={method}",
                "device=cuda",
                "dry_run=true",
                "logger=disabled",
            ],
        )
    return build_specs(cfg)


def main() -> None:
    cols = [
        "params (B)",
        "host (SparseGPT)",
        "SparseGPT device",
        "Wanda device",
        "SAFE+ device",
        "Elsa 1 GPU",
        "Elsa DDP x4 /rank",
        "Elsa FSDP x4 /rank",
        "Elsa-L 1 GPU",
        "Elsa-L FSDP x8 /rank",
        "Elsa-L FSDP x8 ckpt /rank",
    ]
    print("| model | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for model in MODELS:
        shapes = shapes_of(meta_model(specs_for(model, "wanda").model))

        def dev(method, world=1, engine=None, **kw):
            k = knobs_of(specs_for(model, method), Launch(world=world))
            if engine:
                k = replace(k, engine=engine, world=world)
            return build_plan(model, shapes, replace(k, **kw)).total("device")

        sgpt = build_plan(model, shapes, knobs_of(specs_for(model, "sparsegpt"), Launch()))
        cells = [
            f"{shapes.params / 1e9:.2f}",
            f"{sgpt.total('host'):.1f}",
            f"{sgpt.total('device'):.1f}",
            f"{dev('wanda'):.1f}",
            f"{dev('safe_plus'):.1f}",
            f"{dev('elsa'):.1f}",
            f"{dev('elsa', 4):.1f}",
            f"{dev('elsa', 4, 'fsdp'):.1f}",
            f"{dev('elsa_l'):.1f}",
            f"{dev('elsa_l', 8, 'fsdp'):.1f}",
            f"{dev('elsa_l', 8, 'fsdp', checkpointing=True):.1f}",
        ]
        print(f"| {model} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
