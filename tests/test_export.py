"""Export a pruned model, reload it in eval-only mode: same sparsity, same perplexity."""

import json

import torch

from sparsebench.records.export import load_saved
from sparsebench.run import run

from .conftest import compose


def test_save_reload_round_trip(tmp_path):
    pruned = run(
        compose(
            [
                "model=tiny-llama",
                "logger=disabled",
                "method=sparsegpt",
                "pattern=2:4",
                "save.enabled=true",
            ]
        ),
        tmp_path / "prune",
    )
    folder = tmp_path / "prune" / "model"
    assert pruned["saved_model"] == str(folder)
    assert (folder / "model.safetensors").is_file()
    masks, meta = load_saved(folder)
    assert (meta["method"], meta["pattern"], meta["seed"], meta["data"]["nsamples"]) == (
        "sparsegpt",
        "2:4",
        0,
        8,
    )
    assert meta["fingerprint"] == pruned["fingerprint"]["digest"]
    assert len(masks) == 14 and all(m.dtype == torch.bool for m in masks.values())

    again = run(
        compose(
            [
                "model=local",
                f"model.path={folder}",
                "model.dtype=float32",
                "model.seqlen=64",
                "protocol=tiny",
                "method=dense",
                "logger=disabled",
            ]
        ),
        tmp_path / "reload",
    )
    assert again["per_layer_sparsity"] == pruned["per_layer_sparsity"]
    assert again["loaded_pruned_model"]["method"] == "sparsegpt"
    for name in ("wikitext2", "c4"):
        assert again["metrics"][name] == pruned["metrics"][name]
    on_disk = json.loads((tmp_path / "reload" / "results.json").read_text())
    assert on_disk["sparsity"]["actual_sparsity"] == 0.5


def test_reload_detects_tampered_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    from sparsebench.errors import SparsebenchError

    run(
        compose(["model=tiny-llama", "logger=disabled", "method=wanda", "save.enabled=true"]),
        tmp_path / "p",
    )
    folder = tmp_path / "p" / "model"
    weights = load_file(str(folder / "model.safetensors"))
    key = next(k for k in weights if "q_proj" in k)
    weights[key] = weights[key] + 1.0  # densify one tensor
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    try:
        run(
            compose(
                [
                    "model=local",
                    f"model.path={folder}",
                    "model.dtype=float32",
                    "model.seqlen=64",
                    "protocol=tiny",
                    "method=dense",
                    "logger=disabled",
                ]
            ),
            tmp_path / "r",
        )
    except SparsebenchError as err:
        assert "outside the mask are non-zero" in str(err)
    else:
        raise AssertionError("tampered weights were not detected")
