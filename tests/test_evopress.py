"""EvoPress (schedule=evopress): the released search runs call for call the same
(scripts/parity_evopress.py: the same fitness and levels as the released code for the same
seed, docs/results.md). These check the level grid, the database (each level's exact count, its
levels pruned from the dense model's inputs), what the search promises (every mutation keeps
the total; with the whole pool scored, the elitist winner never gets worse), the resume after an
interrupt, the command-line path (masks verified per linear, export and reload, the database
reused) and bad input refused before any work."""

import json
import random

import pytest
import torch

from sparsebench import evopress
from sparsebench.allocation import allocate
from sparsebench.models import load_model, prunable_linears
from sparsebench.pipeline import prune_model
from sparsebench.registry import METHODS
from sparsebench.sparsity import EvoPressSearch, Schedule, expected_pruned, parse_pattern

from .conftest import TINY, run_cli, run_reload, tiny_spec

UNSTRUCTURED = parse_pattern("unstructured")


def test_the_released_level_grid():
    # one level moves d = 128 weights of a 1024-weight linear: a step of 0.125
    assert evopress.levels_of(1024, 0.5, 128, 8) == {
        lv: 0.5 + lv * 0.125 for lv in range(-4, 4)
    }  # level 4 would prune every weight: left out
    assert evopress.levels_of(1024, 0.5, 128, 2) == {-2: 0.25, -1: 0.375, 0: 0.5, 1: 0.625, 2: 0.75}
    spec = EvoPressSearch(num_levels=8)
    assert evopress.weights_diff(spec, 0.7, 576) == int(0.5 * 0.3 / 8 * 576**2)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))
    model, tok = load_model(tiny_spec("llama"), seed=0)
    calib = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
    return model, tok, calib


def _allocate(model, calib, spec, workdir=None, method="wanda", sparsity=0.5):
    pruner = METHODS.build(method, {})
    return allocate(
        Schedule(allocation="evopress", evopress=spec), model, calib, sparsity, UNSTRUCTURED,
        pruner.group, torch.device("cpu"), pruner, 0, workdir,
    )  # fmt: skip


SMALL = dict(num_levels=2, generations=4, offspring=6, survivors=(2, 1), tokens=(32, 64))


def test_the_database_holds_every_level_at_its_exact_count_from_dense_inputs(tiny):
    model, tok, calib = tiny
    dense = {n: lin.weight.detach().clone() for n, lin in prunable_linears(model).items()}
    alloc = _allocate(model, calib, EvoPressSearch(**SMALL))
    db = alloc.database
    assert sorted(db.names) == sorted(dense)
    for name in db.names:
        for level, s in db.levels[name].items():
            w = db.weight(name, level)
            assert int((w == 0).sum()) == expected_pruned(tuple(w.shape), s, UNSTRUCTURED, "row")
            assert torch.equal(w[w != 0], dense[name][w != 0])  # Wanda: the dense values kept
    # block 0's level 0 is Wanda's uniform mask (the same inputs); the database is the dense
    # model's, so it was left dense for the search
    wanda, _ = load_model(tiny_spec("llama"), seed=0)
    out = prune_model(wanda, tok, method="wanda", sparsity=0.5, calib=calib, seqlen=32)
    first = [n for n in db.names if n.startswith("model.layers.0.")]
    assert first and all(torch.equal(db.weight(n, 0) != 0, out.masks[n]) for n in first)


def test_every_mutation_keeps_the_total_and_levels_that_exist(tiny):
    model, _, calib = tiny
    db = _allocate(model, calib, EvoPressSearch(**SMALL)).database
    rng = random.Random(3)
    parent = [0] * len(db.names)
    for _ in range(200):
        child = evopress._mutate(rng, parent, db, EvoPressSearch())
        assert sum(child) == 0  # (down and up in the same linear: the parent again, as released)
        assert all(lv in db.levels[n] for n, lv in zip(db.names, child))
        parent = child
    # equal sums of levels: the same number of pruned weights, up to each level's count rule
    total = sum(torch.Size(db.shapes[n]).numel() for n in db.names)
    pruned = sum(int((db.weight(n, lv) == 0).sum()) for n, lv in zip(db.names, parent))
    assert abs(pruned / total - 0.5) < len(db.names) * 8 / total


def test_scored_on_the_whole_pool_the_elitist_winner_never_gets_worse(tiny):
    model, _, calib = tiny
    spec = EvoPressSearch(**{**SMALL, "generations": 4, "tokens": (6 * 32, 6 * 32)})
    report = _allocate(model, calib, spec).report
    history = report["search"]["fitness_history"]
    assert all(b <= a * (1 + 1e-4) for a, b in zip(history, history[1:])), history
    assert report["kl_found_levels"] <= report["kl_uniform_levels"] * (1 + 1e-4)
    assert len(report["targets"]) == 2 and abs(report["expected_sparsity"] - 0.5) < 1e-9


def test_no_generation_is_the_databases_uniform_levels(tiny):
    model, _, calib = tiny
    alloc = _allocate(model, calib, EvoPressSearch(**{**SMALL, "generations": 0}))
    assert set(alloc.report["levels"].values()) == {0} and alloc.report["search"]["fitness"] is None
    assert alloc.report["kl_found_levels"] == alloc.report["kl_uniform_levels"]


def test_an_interrupted_search_resumes_to_the_same_result(tiny, tmp_path, monkeypatch):
    model, _, calib = tiny
    spec = EvoPressSearch(**{**SMALL, "generations": 5})
    whole = _allocate(model, calib, spec, tmp_path / "a").report["levels"]
    (tmp_path / "b").mkdir()
    calls = {"n": 0}
    real = evopress.kl_fitness

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 20:  # inside the fourth generation
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evopress, "kl_fitness", flaky)
    model.load_state_dict(load_model(tiny_spec("llama"), seed=0)[0].state_dict())
    with pytest.raises(KeyboardInterrupt):
        _allocate(model, calib, spec, tmp_path / "b")
    saved = json.loads((tmp_path / "b" / evopress.STATE_FILE).read_text())
    assert 0 < saved["generation"] < 5
    monkeypatch.setattr(evopress, "kl_fitness", real)
    model.load_state_dict(load_model(tiny_spec("llama"), seed=0)[0].state_dict())
    again = _allocate(model, calib, spec, tmp_path / "b").report
    assert again["search"]["resumed"] and again["levels"] == whole
    assert again["database"]["built"] is False  # the database came from the cache


@pytest.mark.models  # a CLI run, an export and its reload: make test-models
def test_sparsegpt_with_evopress_from_the_cli_reloads_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))
    argv = TINY + [
        "method=sparsegpt", "schedule=evopress_cpu", "schedule.evopress.generations=3",
        "schedule.evopress.tokens=[128,256]", "sparsity=0.7", "save.enabled=true",
    ]  # fmt: skip
    first = run_cli(argv, tmp_path / "a")
    alloc = first["allocation"]
    assert alloc["kind"] == "evopress" and alloc["database"]["built"]
    assert set(alloc["linear_targets"]) == set(first["per_layer_sparsity"])
    assert len(set(alloc["linear_targets"].values())) > 1  # the search moved levels
    for name, s in first["per_layer_sparsity"].items():  # each mask at its own level's target
        assert abs(s - alloc["linear_targets"][name]) < 0.01
    again = run_reload(tmp_path / "a", tmp_path / "b")
    assert again["metrics"]["wikitext2"] == first["metrics"]["wikitext2"]
    # the report plots the per-block sparsities beside any other allocation's, labelled by preset
    from sparsebench.records.report import main as report

    report([str(tmp_path)])
    assert (tmp_path / "report_allocation.png").is_file()
    assert "evopress_cpu-sparsegpt" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "extra, says",
    [
        (["method=elsa"], "one-shot method"),
        (["method=oats"], "one-shot method"),
        (["method=wanda", "refine=dsnot"], "with a refinement"),
        (["method=wanda", "schedule.evopress.survivors=[2,2]"], "last keeps 1"),
        (["method=wanda", "schedule.evopress.tokens=[64]"], "same stages"),
        (["method=wanda"], "lower the tokens"),  # the CPU preset's 1024 tokens > 8 x 64
        (["method=wanda", "pattern=2:4"], "pattern 2:4"),
    ],
)
def test_bad_input_is_refused_before_any_work(extra, says, tmp_path, capsys):
    from sparsebench import cli

    with pytest.raises(SystemExit) as err:
        cli.main(TINY + ["schedule=evopress_cpu", *extra, f"hydra.run.dir={tmp_path / 'run'}"])
    assert err.value.code
    assert says in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_plan_holds_the_logits_and_states_the_database_bytes():
    from sparsebench.launch import memory_plan
    from sparsebench.specs import build_specs

    from .conftest import compose

    argv = TINY + ["method=wanda", "schedule=evopress_cpu", "schedule.evopress.tokens=[64,128]"]
    plan, shapes, _ = memory_plan(build_specs(compose(argv)), 1)
    terms = {t["component"]: t["bytes"] for t in plan.as_dict()["terms"]}
    logits = terms["evopress: the dense logits of the search's windows (float32)"]
    assert logits == pytest.approx(8 * 64 * shapes.vocab * 4, abs=1)
    disk = plan.as_dict()["disk_bytes"]["evopress database"]
    assert disk == int(9 * shapes.prunable * (1 / 8 + 0.5 * shapes.dtype_bytes))
