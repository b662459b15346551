"""The recovery stage (issue #16): masks survive every recovery exactly, budgets are
recorded, reconstruction lowers each unit's error, seeds fold into mean/std/n rows."""

import json

import pytest
import torch

from sparsebench import cli
from sparsebench.errors import SparsebenchError
from sparsebench.models import load_model, prunable_linears
from sparsebench.records import report, rows
from sparsebench.records.export import load_saved
from sparsebench.run import run
from sparsebench.specs import build_specs

from .conftest import compose, tiny_spec

TINY = ["model=tiny-llama", "logger=disabled"]


def _run_and_model(tmp_path, overrides, monkeypatch):
    """Run the pipeline and keep the final model object for inspection."""
    import sparsebench.record as runmod

    seen = {}
    real = runmod.load_model

    def spy(spec, seed=0):
        model, tok = real(spec, seed)
        seen.setdefault("model", model)  # the first load is the run's model (later: dense targets)
        return model, tok

    monkeypatch.setattr(runmod, "load_model", spy)
    res = run(compose(TINY + overrides), tmp_path)
    return res, seen["model"]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_masked_finetune_keeps_the_mask_exactly(tmp_path, monkeypatch, pattern):
    res, model = _run_and_model(
        tmp_path,
        [
            "method=wanda",
            f"pattern={pattern}",
            "recover=finetune",
            "recover.steps=6",
            "recover.lr=1e-2",
            "save.enabled=true",
        ],
        monkeypatch,
    )
    masks, _ = load_saved(tmp_path / "model")  # the masks from pruning, before recovery
    before = load_model(tiny_spec("llama"), seed=0)[0]
    changed = 0
    for name, lin in prunable_linears(model).items():
        keep = masks[name]
        assert (lin.weight[~keep] == 0).all(), name  # exactly zero, not small
        changed += int((lin.weight[keep] != prunable_linears(before)[name].weight[keep]).sum())
    assert changed > 0  # the kept weights were trained
    assert res["recover_report"]["steps_run"] == 6
    b = res["budget"]["recover"]
    assert (b["optimizer_steps"], b["train_tokens"]) == (6, 6 * 8 * 64)  # steps x windows x seqlen
    assert (
        res["budget"]["prune"]["calib_tokens"] == 8 * 64
        and res["budget"]["prune"]["optimizer_steps"] == 0
    )
    assert b["wall_s"] > 0 and b["peak_mem_gib"] > 0


def test_masklora_merges_into_a_weight_that_keeps_the_mask(tmp_path, monkeypatch):
    res, model = _run_and_model(
        tmp_path,
        [
            "method=sparsegpt",
            "pattern=2:4",
            "recover=perp",
            "recover.steps=5",
            "recover.lr=5e-2",
            "save.enabled=true",
        ],
        monkeypatch,
    )
    masks, _ = load_saved(tmp_path / "model")
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged and unloaded
    for name, lin in prunable_linears(model).items():
        assert type(lin) is torch.nn.Linear
        assert (lin.weight[~masks[name]] == 0).all(), name
    rep = res["recover_report"]
    # rank 16 x (in + out) per linear: q 64+64, k and v 64+32, o 64+64, gate and up 64+128, down
    # 128+64
    assert rep["variant"] == "masklora" and rep["adapter_params"] == 2 * 16 * (
        128 + 96 + 96 + 128 + 3 * 192
    )
    assert (
        rep["trainable_params"] == rep["adapter_params"] + 5 * 64
    )  # + the norms (released default)
    assert res["sparsity"]["actual_sparsity"] == 0.5


def test_masklora_update_is_masked_before_merging():
    """The adapter layer's forward equals base weight + (B A * scaling) * mask."""
    from peft import LoraConfig, get_peft_model

    from sparsebench.recover.perp import _mask_lora_layer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False))
    mask = torch.rand(4, 8) > 0.5
    with torch.no_grad():
        net[0].weight.mul_(mask)
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # a non-zero update
    _mask_lora_layer(layer, mask)
    x = torch.randn(3, 8)
    delta = (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    )
    expected = x @ (layer.base_layer.weight + delta * mask).T
    torch.testing.assert_close(layer(x), expected)
    merged = model.merge_and_unload()
    assert (merged[0].weight[~mask] == 0).all()


def test_perp_norms_trains_only_norms_and_biases(tmp_path, monkeypatch):
    res, model = _run_and_model(
        tmp_path,
        [
            "method=magnitude",
            "recover=perp",
            "recover.variant=norms",
            "recover.steps=4",
            "recover.lr=1e-2",
        ],
        monkeypatch,
    )
    before = load_model(tiny_spec("llama"), seed=0)[0]
    b = dict(before.named_parameters())
    for name, p in model.named_parameters():
        if "norm" in name:
            assert not torch.equal(p, b[name]), name
        elif name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
            assert torch.equal(p, b[name]), name
    assert (
        res["recover_report"]["trainable_params"] == 64 * 5
    )  # 2 blocks x 2 norms + the final norm


def test_reconstruction_lowers_every_units_error(tmp_path):
    res = run(
        compose(
            TINY
            + [
                "method=wanda",
                "sparsity=0.7",
                "recover=reconstruct",
                "recover.epochs=4",
                "recover.lr=1e-3",
            ]
        ),
        tmp_path,
    )
    units = res["recover_report"]["units"]
    assert [u["unit"] for u in units] == [
        "0.self_attn",
        "0.mlp",
        "1.self_attn",
        "1.mlp",
    ]  # attention, MLP apart
    for u in units:
        assert u["error_after"] < u["error_before"], u
    b = res["budget"]["recover"]
    assert (
        b["calib_tokens"] == 8 * 64 and b["optimizer_steps"] == 4 * 4 * 4
    )  # units x epochs x ceil(8/2)
    assert res["sparsity"]["actual_sparsity"] == pytest.approx(
        0.7, abs=0.02
    )  # per-row rounding (Wanda)


def test_block_granularity_reconstructs_whole_blocks(tmp_path):
    res = run(
        compose(
            TINY
            + [
                "method=magnitude",
                "recover=reconstruct",
                "recover.granularity=block",
                "recover.inputs=dense",
                "recover.lr=1e-3",
                "recover.epochs=2",
            ]
        ),
        tmp_path,
    )
    units = res["recover_report"]["units"]
    assert [u["unit"] for u in units] == ["0.block", "1.block"]
    assert all(u["error_after"] < u["error_before"] for u in units)


def test_recovery_needs_masks():
    with pytest.raises(SparsebenchError, match="recovery stage needs masks"):
        run(
            compose(TINY + ["method=dense", "recover=finetune"]),
            "/tmp/sparsebench-test-never-written",
        )


@pytest.mark.parametrize("recover", ["finetune", "perp", "reconstruct"])
def test_cli_recovery_records_its_budget(tmp_path, capsys, recover):
    out = tmp_path / "run"
    try:
        cli.main(
            [
                *TINY,
                "method=sparsegpt",
                "sparsity=0.5",
                f"recover={recover}",
                f"hydra.run.dir={out}",
            ]
        )
    except SystemExit as err:
        pytest.fail(f"exit {err.code}: {capsys.readouterr().err}")
    rec = json.loads((out / "results.json").read_text())
    assert rec["status"] == "complete" and set(rec["budget"]) == {"prune", "recover"}
    assert rec["budget"]["recover"]["optimizer_steps"] > 0 and rec["timings_s"]["recover"] > 0


def test_recover_options_are_validated():
    with pytest.raises(SparsebenchError, match=r"recovery 'finetune' option 'lr' must be > 0"):
        build_specs(compose(TINY + ["recover=finetune", "recover.lr=0"]))
    with pytest.raises(
        SparsebenchError, match=r"option 'variant' is 'lora'; valid: masklora, norms"
    ):
        build_specs(compose(TINY + ["recover=perp", "recover.variant=lora"]))


def test_finetune_cpu_spends_elsa_cpus_tokens():
    """The control reads the same budget as the preset it controls."""
    elsa = build_specs(compose(["method=elsa_cpu"])).pruner
    ft = build_specs(compose(["method=sparsegpt", "recover=finetune_cpu"])).recover
    assert (ft.steps, ft.batch_size, ft.seqlen, ft.lr, ft.betas, ft.clip, ft.seed) == (
        elsa.steps,
        elsa.batch_size,
        elsa.seqlen,
        elsa.lr,
        elsa.betas,
        elsa.clip,
        elsa.seed,
    )
    assert ft.freeze_embeddings == elsa.freeze_embeddings


# ----------------------------------------------------------------------------- report


def test_seed_sweep_folds_into_mean_std_n(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    try:
        cli.main(
            [
                "-m",
                *TINY,
                "method=magnitude,wanda",
                "sparsity=0.6",
                "seed=0,1,2",
                f"hydra.sweep.dir={sweep}",
            ]
        )
    except SystemExit as err:
        pytest.fail(f"exit {err.code}")
    rows = report.table(report.load_results(sweep))
    pruned = [r for r in rows if r["method"] != "dense"]
    assert sorted(r["label"] for r in pruned) == ["magnitude", "wanda"]  # one row per config
    for r in pruned:
        assert r["n"] == 3 and r["seeds"] == ["0", "1", "2"]
        runs = [
            json.loads(p.read_text())["metrics"]["wikitext2"]
            for p in sweep.glob(f"*_{r['method']}_*/results.json")
        ]
        mean = sum(runs) / 3
        std = (sum((x - mean) ** 2 for x in runs) / 2) ** 0.5
        assert r["wikitext2"] == pytest.approx(mean) and r["wikitext2_std"] == pytest.approx(std)
    md = report.markdown(rows)
    assert "(n=3 seeds)" in md and "within spread of" in md
    report.main([str(sweep), "--by-tokens"])
    assert (sweep / "report_nonzero.png").stat().st_size > 5000


def test_folded_rows_join_their_protocols(tmp_path):
    """Two dense runs of one config whose stored protocol ids differ (an id from older
    code) fold into one row, and pruned rows of either id divide by it; a protocol no
    fold links (seqlen 1024 here) keeps its own dense run."""
    runs = [
        ("dense", "old", 512, 20.0),
        ("dense", "new", 512, 20.0),
        ("wanda", "new", 512, 40.0),
        ("wanda", "old", 512, 80.0),
        ("dense", "long", 1024, 10.0),
        ("magnitude", "long", 1024, 40.0),
    ]
    for i, (method, proto, seqlen, ppl) in enumerate(runs):
        folder = tmp_path / str(i)
        folder.mkdir()
        rec = {
            "status": "complete",
            "protocol_id": proto,
            "config": {
                "model": {"name": "m", "seqlen": seqlen},
                "method": {"name": method},
                "sparsity": 0.5,
                "recover": {"name": "finetune" if i == 3 else "none"},
                "seed": 0,
            },
            "metrics": {"wikitext2": ppl, "c4": ppl},
            "sparsity": {"pattern": "unstructured"},
        }
        (folder / "results.json").write_text(json.dumps(rec))
    rows = report.table(report.load_results(tmp_path))
    dense = [r for r in rows if r["method"] == "dense"]
    assert sorted((r["n"], r["protocol_ids"]) for r in dense) == [
        (1, ["long"]),
        (2, ["new", "old"]),
    ]
    retained = {
        r["label"]: r["wikitext2_dense_retained_pct"] for r in rows if r["method"] != "dense"
    }
    assert retained == {"wanda": 50.0, "wanda+finetune": 25.0, "magnitude": 25.0}
    assert len({r["protocol"] for r in rows}) == 2


def test_rows_that_read_alike_name_the_keys_that_differ(tmp_path):
    """Overrides of one recipe (the SAFE control at two learning rates, the released
    defaults) would read "wanda+reconstruct" three times: each label gains the fewest keys
    that tell the configs apart; seeds of one config still fold into one row, unnamed."""
    runs = [(1e-5, 1, 0), (5e-3, 5, 0), (3e-3, 5, 0), (3e-3, 5, 1)]
    for i, (lr, epochs, seed) in enumerate(runs):
        folder = tmp_path / str(i)
        folder.mkdir()
        rec = {
            "status": "complete",
            "protocol_id": "p",
            "config": {
                "model": {"name": "m"},
                "method": {"name": "wanda"},
                "sparsity": 0.9,
                "seed": seed,
                "recover": {"name": "reconstruct", "lr": lr, "epochs": epochs, "seed": seed},
            },
            "metrics": {"wikitext2": 100.0 + i, "c4": 90.0},
            "sparsity": {"pattern": "unstructured"},
        }
        (folder / "results.json").write_text(json.dumps(rec))
    other = tmp_path / "9"
    other.mkdir()
    (other / "results.json").write_text(
        json.dumps(
            {
                "status": "complete",
                "config": {
                    "model": {"name": "m"},
                    "method": {"name": "sparsegpt"},
                    "sparsity": 0.9,
                    "recover": {"name": "none"},
                    "seed": 0,
                },
                "metrics": {"wikitext2": 50.0, "c4": 50.0},
                "sparsity": {"pattern": "unstructured"},
            }
        )
    )
    rows = report.table(report.load_results(tmp_path))
    assert sorted((r["label"], r["n"]) for r in rows) == [
        ("sparsegpt", 1),
        ("wanda+reconstruct (recover.lr=0.003)", 2),
        ("wanda+reconstruct (recover.lr=0.005)", 1),
        ("wanda+reconstruct (recover.lr=1e-05)", 1),
    ]
    paths = report.write_report(tmp_path)
    assert "ident" not in paths["csv"].read_text().splitlines()[0].split(",")


def test_within_spread_marks_and_labels():
    base = {"model": "m", "protocol_id": "p", "sparsity": 0.5, "pattern": "unstructured", "n": 3}
    a = {**base, "label": "a", "wikitext2": 10.0, "wikitext2_std": 0.5}
    b = {**base, "label": "b", "wikitext2": 10.8, "wikitext2_std": 0.4}
    c = {**base, "label": "c", "wikitext2": 12.0, "wikitext2_std": 0.1}
    rows.mark_within_spread([a, b, c])
    assert (
        a["within_spread_of"] == ["b"]
        and b["within_spread_of"] == ["a"]
        and c["within_spread_of"] == []
    )
    assert (
        rows.label_of(
            {"method": {"name": "elsa", "preset": "elsa_cpu"}, "recover": {"name": "none"}}
        )
        == "elsa_cpu"
    )
    assert (
        rows.label_of({"method": {"name": "sparsegpt"}, "recover": {"name": "finetune_cpu"}})
        == "sparsegpt+finetune_cpu"
    )
    assert (
        rows.label_of(
            {
                "method": {"name": "sparsegpt"},
                "recover": {"name": "finetune", "preset": "finetune_cpu"},
            }
        )
        == "sparsegpt+finetune_cpu"
    )


def test_train_tokens_group_the_table(tmp_path):
    for i, (tokens, label) in enumerate([(0, "wanda"), (204800, "elsa"), (204800, "wanda")]):
        folder = tmp_path / str(i)
        folder.mkdir()
        rec = {
            "status": "complete",
            "config": {
                "model": {"name": "m"},
                "method": {"name": label},
                "sparsity": 0.9,
                "recover": {"name": "finetune" if i == 2 else "none"},
                "seed": 0,
            },
            "metrics": {"wikitext2": 100.0 + i, "c4": 90.0},
            "sparsity": {"pattern": "unstructured"},
            "budget": {
                "prune": {
                    "train_tokens": tokens,
                    "optimizer_steps": 200 if tokens else 0,
                    "wall_s": 1.0,
                }
            },
        }
        (folder / "results.json").write_text(json.dumps(rec))
    md = report.markdown(report.table(report.load_results(tmp_path)), by_tokens=True)
    assert md.index("Training tokens: 0") < md.index("Training tokens: 204,800")
    second = md[md.index("Training tokens: 204,800") :]
    assert "| elsa |" in second and "| wanda+finetune |" in second and "| wanda |" not in second
