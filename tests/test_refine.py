"""RIA (method=ria) and the refine stage (refine=dsnot): the score by hand, the released count
rules, DSnoT's promises (every row's and every N:M group's count kept, the error it tracks
lowered, nothing when told to stop at once), its statistics, and both from the command line
(labels, reports, refusals, save and reload, OWL, N:M, a mixture of experts)."""

import math

import pytest
import torch

from sparsebench.errors import SparsebenchError
from sparsebench.pruners.ria import ria_score
from sparsebench.refine.dsnot import InputMoments, dsnot_nm, dsnot_unstructured, is_attention
from sparsebench.sparsity import Pattern, expected_pruned, project

from .conftest import TINY, run_cli, run_reload

# ----------------------------------------------------------------------------- RIA


def test_ria_score_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    norms_sq = torch.tensor([4.0, 9.0])
    # column sums of |W|: 4, 6; row sums: 3, 7; activation factor sqrt(||X||)^... = ||X||^0.5
    want = torch.tensor(
        [
            [(1 / 4 + 1 / 3) * 2**0.5, (2 / 6 + 2 / 3) * 3**0.5],
            [(3 / 4 + 3 / 7) * 2**0.5, (4 / 6 + 4 / 7) * 3**0.5],
        ]
    )
    assert torch.allclose(ria_score(w, norms_sq, 0.5), want)
    assert torch.allclose(ria_score(w, norms_sq, 0.0), want / torch.tensor([2**0.5, 3**0.5]))


def test_ria_counts_follow_the_released_rules():
    score = torch.rand(64, 96, generator=torch.Generator().manual_seed(1))  # distinct scores
    k = int(score.numel() * 0.7)
    keep = project(score, 0.7, Pattern(), "tensor+1")
    assert int((~keep).sum()) == k + 1 == expected_pruned((64, 96), 0.7, Pattern(), "tensor+1")
    assert bool((score[~keep].max() < score[keep].min()))  # everything <= the threshold goes
    per_row = project(score, 0.7, Pattern(), "row")
    assert ((~per_row).sum(1) == int(96 * 0.7)).all()


def test_ria_from_the_cli_with_its_count_rule_and_label(tmp_path):
    res = run_cli(TINY + ["method=ria", "sparsity=0.6"], tmp_path / "a")
    sp = res["sparsity"]
    # per block: q, o 64x64; k, v 32x64; gate, up, down 8192 weights; each prunes int(n x s) + 1
    shapes = [4096, 2048, 2048, 4096, 8192, 8192, 8192]
    assert sp["pruned_params"] == 2 * sum(int(n * 0.6) + 1 for n in shapes)
    assert "released threshold rule" in sp["count_rule"]
    row = run_cli(TINY + ["method=ria", "method.per_row=true"], tmp_path / "b")["sparsity"]
    assert row["actual_sparsity"] == 0.5
    nm = run_cli(TINY + ["method=ria", "pattern=2:4"], tmp_path / "c")["sparsity"]
    assert nm["actual_sparsity"] == 0.5


# ----------------------------------------------------------------------------- DSnoT


def _moments(cols: int, seed: int = 0, windows: int = 3) -> InputMoments:
    g = torch.Generator().manual_seed(seed)
    m = InputMoments(cols, torch.device("cpu"))
    shift = torch.randn(cols, generator=g)
    for _ in range(windows):
        m.add(torch.randn(1, 32, cols, generator=g) + shift)
    return m


def _wanda_pruned(w, m, s):
    return ~project(w.abs() * m.norms.sqrt().unsqueeze(0), s, Pattern(), "row")


def test_input_moments_are_the_pooled_statistics():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, 16, 8, generator=g) * (i + 1) for i in range(3)]
    m = InputMoments(8, torch.device("cpu"))
    for x in xs:
        m.add(x)
    flat = torch.cat([x[0] for x in xs])  # (48, 8)
    assert torch.allclose(m.mean.squeeze(1), flat.mean(0), atol=1e-6)
    # the released pooling: the token-weighted mean of each window's biased variance
    pooled = torch.stack([x[0].var(0, unbiased=False) for x in xs]).mean(0)
    assert torch.allclose(m.var.squeeze(1), pooled, atol=1e-5)
    assert torch.allclose(m.sum_row, torch.stack([x[0].sum(0) for x in xs]).mean(0), atol=1e-5)
    assert torch.allclose(m.norms, torch.stack([x[0].norm(dim=0) ** 2 for x in xs]).mean(0))


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_dsnot_keeps_every_rows_count_and_lowers_the_error_it_tracks(sparsity):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g)
    m = _moments(256, seed=1)  # another draw than the weights'
    pruned = _wanda_pruned(w, m, sparsity)
    out = dsnot_unstructured(w, pruned, m, without_same_sign=False)
    assert torch.equal(out.sum(1), pruned.sum(1)) and bool((out != pruned).any())
    metric = w * m.sum_row.unsqueeze(0)
    before = (metric * pruned).sum(1).abs()
    after = (metric * out).sum(1).abs()
    # with the sign rule every swap moves the error towards 0 without crossing it, while the
    # walk finds kept weights of the sign that helps (here: each row has more than 50)
    # (a float32 sum of a row's 256 metrics rounds each swap's update by ~1e-7 of the error)
    assert bool((after <= before * (1 + 1e-5)).all())
    assert float(after.sum()) < float(before.sum())


def test_dsnot_changes_nothing_when_told_to_stop():
    w = torch.randn(16, 128)
    m = _moments(128)
    pruned = _wanda_pruned(w, m, 0.5)
    assert torch.equal(dsnot_unstructured(w, pruned, m, max_cycle_time=0), pruned)
    assert torch.equal(dsnot_unstructured(w, pruned, m, update_threshold=math.inf), pruned)


def test_dsnot_on_short_rows_keeps_counts_where_the_released_loop_runs_off():
    """16 columns at 0.5 and 50 cycles: the walks run out of candidates; rows stop, counts
    stay exact (tensor-group masks: every row its own count)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 16, generator=g)
    m = _moments(16, seed=5)
    pruned = ~project(w.abs(), 0.5, Pattern(), "tensor")  # uneven rows
    out = dsnot_unstructured(w, pruned, m, update_threshold=0.0)
    assert torch.equal(out.sum(1), pruned.sum(1))


def test_dsnot_nm_keeps_every_group():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=g)
    m = _moments(64, seed=2)
    score = w.abs() * m.norms.sqrt().unsqueeze(0)
    pruned = ~project(score, 0.5, Pattern(2, 4))
    out = dsnot_nm(w, pruned, score, m, 4, update_threshold=0.0)
    assert bool((out != pruned).any())
    assert bool(((~out).reshape(32, 16, 4).sum(-1) == 2).all())


def test_the_mlp_is_skipped_by_name():
    assert is_attention("self_attn.q_proj") and is_attention("attn.c_attn.q")
    assert not is_attention("mlp.down_proj") and not is_attention("fc1")
    assert not is_attention("block_sparse_moe.experts.0.w1")


def test_wanda_with_dsnot_from_the_cli(tmp_path):
    plain = run_cli(TINY + ["method=wanda", "sparsity=0.6"], tmp_path / "plain")
    res = run_cli(
        TINY + ["method=wanda", "sparsity=0.6", "refine=dsnot", "refine.skip=none"],
        tmp_path / "dsnot",
    )
    assert res["sparsity"]["actual_sparsity"] == plain["sparsity"]["actual_sparsity"]
    report = res["method_report"]["refine"]
    assert report["name"] == "dsnot" and report["start"] == "score" and report["refined"] == 14
    assert report["swaps"] > 0 and res["metrics"]["wikitext2"] != plain["metrics"]["wikitext2"]
    from sparsebench.records.report import write_report
    from sparsebench.records.summary import run_summary

    assert run_summary(res, tmp_path).startswith("sparsebench: wanda + dsnot at 0.6")
    write_report(tmp_path)
    assert "| wanda + dsnot |" in (tmp_path / "report.md").read_text()
    # the default skips the MLP: fewer linears refined
    mlp = run_cli(TINY + ["method=wanda", "refine=dsnot"], tmp_path / "mlp")
    assert mlp["method_report"]["refine"]["refined"] == 8  # q, k, v, o of 2 blocks


@pytest.mark.parametrize(
    "extra",
    [
        ["method=sparsegpt", "sparsity=0.7"],  # starts from its saliency, per row
        ["method=alps"],  # no score: its own masks (tensor group) are refined
        ["method=magnitude"],  # in the block walk: |W|'s lowest per row, refined
        ["method=magnitude", "refine.init=mask"],  # its own per-tensor masks, refined
        ["method=ria", "pattern=2:4"],
        ["method=wanda", "schedule=owl", "sparsity=0.7"],
        ["method=wanda", "model=tiny-mixtral"],
    ],
)
def test_dsnot_refines_every_one_shot_method(extra, tmp_path):
    argv = ["model=tiny-llama", "logger=disabled", "refine=dsnot", "refine.skip=none", *extra]
    res = run_cli(argv, tmp_path)
    assert res["status"] == "complete"  # the verifier checked every count after the refinement
    assert res["method_report"]["refine"]["refined"] > 0


def test_a_refined_export_reloads_verified(tmp_path):
    run_cli(TINY + ["method=wanda", "refine=dsnot", "save.enabled=true"], tmp_path / "a")
    again = run_reload(tmp_path / "a", tmp_path / "b")
    assert again["loaded_pruned_model"]["label"] == "wanda + dsnot"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["method=dense"], r"refine=dsnot refines .* method dense has no masks to refine"),
        (["method=safe"], r"method safe has no block-by-block masks; methods it refines: alps, la"),
        (["method=alps", "refine.init=score"], r"refine.init=score: method alps has no score"),
        (["refine.skip=all"], r"skip"),
    ],
)
def test_a_refinement_that_cannot_run_is_refused_before_any_work(extra, message, tmp_path):
    from sparsebench.specs import build_specs

    from .conftest import compose

    with pytest.raises(SparsebenchError, match=message):
        build_specs(compose(TINY + ["refine=dsnot", *extra]))


def test_no_refinement_keeps_the_identity_of_runs_before_the_key():
    from sparsebench.records.ledger import identity

    config = {"method": {"name": "wanda"}, "sparsity": 0.5, "seed": 0}
    assert identity({**config, "refine": {"name": "none"}}) == identity(config)
    assert identity({**config, "refine": {"name": "dsnot"}}) != identity(config)


def test_the_memory_plan_counts_a_refinement():
    from sparsebench.launch import memory_plan
    from sparsebench.specs import build_specs

    from .conftest import compose

    def device_terms(extra):
        plan, _, _ = memory_plan(build_specs(compose(TINY + ["method=wanda", *extra])), 1)
        return {
            t["component"]: t["bytes"] for t in plan.as_dict()["terms"] if t["where"] == "device"
        }

    plain, refined = device_terms([]), device_terms(["refine=dsnot"])
    added = set(refined) - set(plain)
    assert added == {
        "statistics: a refinement's input moments (float32)",
        "refine copies: a group's dense weights; one linear's metrics, orders, masks",
    }


# ----------------------------------------------------------------------------- RIA's reallocation


def test_the_snake_order_and_lexsort_by_hand():
    from sparsebench.pruners.ria import lexsort, snake_order

    assert snake_order(torch.arange(8), 4).tolist() == [0, 3, 4, 7, 1, 2, 5, 6]
    first, last = torch.tensor([0, 1, 0, 1]), torch.tensor([2, 1, 1, 2])
    assert lexsort([first, last]).tolist() == [2, 1, 0, 3]  # by the last key, ties by the first


def test_the_assignment_round_keeps_nm_in_its_order(tmp_path):
    res = run_cli(
        TINY + ["method=ria", "pattern=2:4", "method.reallocation=true", "method.lsa=true"],
        tmp_path,
    )  # the verifier checked every group in the order the assignment chose
    assert len(res["column_orders"]) == 14 and res["sparsity"]["actual_sparsity"] == 0.5


def test_reallocated_masks_are_nm_in_their_order_and_survive_save_and_reload(tmp_path):
    flags = ["method.reallocation=true"]
    from safetensors.torch import load_file

    from sparsebench.evaluation.kernels import nm_violations

    res = run_cli(TINY + ["method=ria", "pattern=2:4", "save.enabled=true", *flags], tmp_path / "a")
    assert len(res["column_orders"]) == 14 and res["sparsity"]["actual_sparsity"] == 0.5
    folder = tmp_path / "a" / "model"
    orders = load_file(str(folder / "sparsebench_column_orders.safetensors"))
    weights = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    w, order = weights[f"{name}.weight"], orders[name]
    assert sorted(order.tolist()) == list(range(w.shape[1]))  # a permutation of the columns
    assert nm_violations(w[:, order], 2, 4) == 0  # 2:4 in the permuted order
    assert any(nm_violations(weights[f"{n}.weight"], 2, 4) for n in orders)  # not as stored
    again = run_cli(
        ["model=local", f"model.path={folder}", "method=dense", "logger=disabled"], tmp_path / "b"
    )  # the verifier checked every group in its order; the model computes what was pruned
    assert again["column_orders"] == res["column_orders"]
    assert again["metrics"]["wikitext2"] == res["metrics"]["wikitext2"]


def test_reallocation_with_a_refinement_or_lsa_alone_is_refused():
    from sparsebench.specs import build_specs

    from .conftest import compose

    with pytest.raises(SparsebenchError, match="permutes input columns first"):
        build_specs(compose(TINY + ["method=ria", "method.reallocation=true", "refine=dsnot"]))
    with pytest.raises(SparsebenchError, match="set method.reallocation=true too"):
        build_specs(compose(TINY + ["method=ria", "method.lsa=true"]))
