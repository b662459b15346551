"""The papers' other baselines (issue #19): OWL allocation, ALPS, L-ADMM."""

import pytest
import torch
from torch import nn

from sparsebench.allocation import balance, outlier_ratios, owl_targets
from sparsebench.errors import SparsebenchError
from sparsebench.models import find_blocks, find_linears, load_model, prunable_linears
from sparsebench.pruners.alps import ALPS, masked_cg
from sparsebench.pruners.ladmm import LADMM
from sparsebench.pruners.layerwise import RunningMean, scaled_gram
from sparsebench.records import report
from sparsebench.records.export import load_saved
from sparsebench.run import run
from sparsebench.sparsity import Pattern, expected_pruned
from sparsebench.specs import build_specs

from .conftest import compose, tiny_spec

TINY = ["model=tiny-llama", "logger=disabled"]


# ---------------------------------------------------------------- OWL


def test_owl_targets_by_hand():
    # ratios 1..4 -> scaled to [0, 0.16], centred: keep = 0.3 + (-0.08, -0.0267, 0.0267, 0.08)
    t = owl_targets([1.0, 2.0, 3.0, 4.0], 0.7, 0.08)
    assert t == pytest.approx([0.78, 0.7 + 0.08 / 3, 0.7 - 0.08 / 3, 0.62], abs=1e-12)
    assert sum(t) / 4 == pytest.approx(0.7, abs=1e-12)
    assert owl_targets([2.5, 2.5, 2.5], 0.6, 0.08) == [0.6, 0.6, 0.6]  # equal ratios: uniform
    with pytest.raises(SparsebenchError, match="lower schedule.owl.lam"):
        owl_targets([1.0, 5.0], 0.95, 0.08)


def test_owl_gives_the_block_with_outliers_the_lower_sparsity():
    model, _ = load_model(tiny_spec("llama"), seed=0)
    _, blocks = find_blocks(model)
    with torch.no_grad():  # a hand-made outlier pattern: 2% of block 1's weights 50x larger
        for lin in find_linears(blocks[1]).values():
            w = lin.weight.view(-1)
            w[torch.randperm(w.numel())[: w.numel() // 50]] *= 50
    calib = torch.randint(0, model.config.vocab_size, (4, 32))
    ratios = outlier_ratios(model, calib, torch.device("cpu"), 5.0)
    assert (
        ratios[1] > 1.0 and ratios[1] > 2 * ratios[0]
    )  # percent: most of the planted 2% stand out
    t = owl_targets(ratios, 0.5, 0.08)
    assert t == pytest.approx([0.58, 0.42])  # two blocks: the full spread, +/- lam


@pytest.mark.parametrize("group", ["row", "tensor", "block:128+1"])
def test_balance_makes_the_total_exact(group):
    shapes = [[(96, 64), (64, 64), (160, 64), (64, 160)]] * 6
    raw = owl_targets([1.0, 3.0, 2.0, 7.0, 4.0, 2.5], 0.7, 0.08)
    total = sum(r * c for b in shapes for r, c in b)

    def count(ts):
        return sum(expected_pruned(s, t, Pattern(), group) for b, t in zip(shapes, ts) for s in b)

    tuned = balance(raw, shapes, 0.7, Pattern(), group)
    assert abs(count(tuned) - 0.7 * total) <= 160  # the last block's smallest step: one row of 160
    assert abs(count(tuned) - 0.7 * total) < abs(count(raw) - 0.7 * total)
    assert max(abs(a - b) for a, b in zip(tuned, raw)) < 0.02  # nudged, not re-allocated


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude", "elsa"])
def test_owl_runs_and_the_verifier_checks_each_block_target(tmp_path, method):
    res = run(
        compose(TINY + [f"method={method}", "sparsity=0.6", "schedule=owl", "save.enabled=true"]),
        tmp_path,
    )
    alloc = res["allocation"]
    assert (
        alloc["kind"] == "owl" and len(alloc["targets"]) == 2 and len(alloc["outlier_ratio"]) == 2
    )
    assert sum(alloc["targets_raw"]) / 2 == pytest.approx(0.6)
    assert alloc["targets"][0] != pytest.approx(
        alloc["targets"][1]
    )  # random blocks differ in outliers
    for name, s in res["per_layer_sparsity"].items():
        block = int(name.split(".")[2])
        assert abs(s - alloc["targets"][block]) < 1 / 64 + 1e-9, (
            name
        )  # per-row rounding of its block's target
    # the released targets (balance=false): each row or group rounds its count to whole weights, at
    # most one weight in a 64-wide row away (SparseGPT's official count may prune one more per
    # block)
    assert abs(0.6 - res["sparsity"]["actual_sparsity"]) < 1 / 64
    assert res["sparsity"]["actual_sparsity"] == pytest.approx(alloc["expected_sparsity"], abs=2e-4)
    # the export remembers the per-block targets: its masks verify again on reload
    masks, meta = load_saved(tmp_path / "model")
    assert meta["block_targets"] == alloc["targets"]
    res2 = run(
        compose(
            [
                "model=local",
                f"model.path={tmp_path / 'model'}",
                "model.dtype=float32",
                "model.seqlen=64",
                "protocol=tiny",
                "method=dense",
                "logger=disabled",
            ]
        ),
        tmp_path / "reload",
    )
    assert res2["sparsity"]["actual_sparsity"] == pytest.approx(res["sparsity"]["actual_sparsity"])


def test_owl_refuses_what_it_cannot_do():
    with pytest.raises(SparsebenchError, match="pattern 2:4 fixes every block"):
        build_specs(compose(TINY + ["method=wanda", "sparsity=0.5", "pattern=2:4", "schedule=owl"]))
    with pytest.raises(SparsebenchError, match="method=dense"):
        build_specs(compose(TINY + ["method=dense", "schedule=owl"]))
    with pytest.raises(SparsebenchError, match="schedule.owl option 'lam' must be < 1"):
        build_specs(compose(TINY + ["method=wanda", "schedule=owl", "schedule.owl.lam=1.5"]))
    specs = build_specs(compose(TINY + ["method=magnitude", "schedule=owl"]))
    assert (
        specs.reads_calibration and specs.needs_calibration
    )  # OWL scores with data even for magnitude


# ---------------------------------------------------------------- ALPS, L-ADMM


def _layer(rows=48, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)  # correlated inputs
    x = (
        torch.randn(tokens, cols, generator=g) @ mix * torch.linspace(0.2, 3.0, cols)
    )  # uneven column norms
    lin = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(rows, cols, generator=g))
    stats = RunningMean(torch.zeros(cols, cols))
    for chunk in x.split(128):
        stats.add_term(chunk.unsqueeze(0), scaled_gram)
    return lin, x, stats


def _error(x, w, w0):
    return float(((x @ w.T - x @ w0.T) ** 2).sum() / (x @ w0.T).pow(2).sum())


def _oneshot_start(w, x, sparsity, pattern):
    """The start both methods improve on: the |W| * ||X_j|| mask over the layer, no update."""
    from sparsebench.sparsity import project

    return w * project(w.abs() * x.norm(dim=0), sparsity, pattern, "tensor")


@pytest.mark.parametrize("cls", [ALPS, LADMM])
@pytest.mark.parametrize(
    "pattern,sparsity", [(Pattern(), 0.7), (Pattern(2, 4), 0.5), (Pattern(4, 8), 0.5)]
)
def test_layerwise_admm_lowers_the_reconstruction_error_below_its_start(cls, pattern, sparsity):
    lin, x, stats = _layer()
    w0 = lin.weight.detach().clone()
    method = cls()
    keep = method.prune_linear(lin, method.prepare(stats), sparsity, pattern)
    w = lin.weight.detach()
    assert int((~keep).sum()) == expected_pruned(
        tuple(w.shape), sparsity, pattern, "tensor"
    )  # exact count
    assert (w[~keep] == 0).all()
    if pattern.is_nm:
        assert (keep.reshape(w.shape[0], -1, pattern.m).sum(-1) == pattern.n).all()
    start = _error(x, _oneshot_start(w0, x, sparsity, pattern), w0)
    after = _error(x, w, w0)
    assert after < 0.8 * start, (start, after)


def test_ladmm_gradual_schedule_ends_at_the_target():
    lin, x, stats = _layer(seed=1)
    m = LADMM(gradual=True)
    keep = m.prune_linear(lin, m.prepare(stats), 0.6, Pattern())
    assert int((~keep).sum()) == int(lin.weight.numel() * 0.6)
    with pytest.raises(SparsebenchError, match="reselect"):
        LADMM(iters=10, reselect=15)


def test_masked_cg_solves_the_restricted_system():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    A = a @ a.T + 12 * torch.eye(12, dtype=torch.float64)
    rhs = torch.randn(5, 12, generator=g, dtype=torch.float64)
    support = torch.rand(5, 12, generator=g) > 0.4
    X = masked_cg(A, rhs, support, torch.zeros(5, 12, dtype=torch.float64), iters=50, rtol=1e-30)
    for r in range(5):  # each row: minimise over its support, a small dense solve
        s = support[r]
        want = torch.linalg.solve(A[s][:, s], rhs[r, s])
        assert torch.allclose(X[r, s], want, atol=1e-8)
        assert (X[r, ~s] == 0).all()


@pytest.mark.parametrize("method", ["alps", "ladmm"])
def test_alps_and_ladmm_run_from_the_cli_in_a_sweep_and_appear_in_the_report(tmp_path, method):
    res = run(compose(TINY + [f"method={method}", "sparsity=0.7"]), tmp_path / method)
    assert res["status"] == "complete"
    assert res["sparsity"]["actual_sparsity"] == pytest.approx(
        sum(
            int(lin.weight.numel() * 0.7)
            for lin in prunable_linears(load_model(tiny_spec("llama"), 0)[0]).values()
        )
        / res["sparsity"]["prunable_params"]
    )
    rows = report.load_results(tmp_path)
    assert [r["method"] for r in rows if r["method"] != "dense"] == [method]
    assert res["budget"]["prune"]["wall_s"] > 0


def test_owl_balance_makes_the_run_total_exact(tmp_path):
    res = run(
        compose(
            TINY + ["method=wanda", "sparsity=0.6", "schedule=owl", "schedule.owl.balance=true"]
        ),
        tmp_path,
    )
    assert res["allocation"]["balance"] is True
    assert abs(res["sparsity"]["actual_sparsity"] - 0.6) < 2e-3  # the last block's rounding step
    assert (
        max(
            abs(a - b)
            for a, b in zip(res["allocation"]["targets"], res["allocation"]["targets_raw"])
        )
        < 0.02
    )
