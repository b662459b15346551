"""OATS (method=oats): each linear held as a sparse S plus low-rank factors U V. Its released code
(stephenqz/OATS) gives the same S, U and V bit for bit (scripts/parity_oats.py, docs/results.md);
these check what the algorithm promises and what the rest of sparsebench must do with such a
linear: the alternation never raises the scaled error, the released counts (rank, zeros per
row, N:M), the forward S x + U (V x), the compression recorded with its split, the export and
reload, the speed measurement against the merged dense weight, and bad input refused."""

import pytest
import torch
from torch import nn

from sparsebench.evaluation.kernels import SparseLinear
from sparsebench.lowrank import SparsePlusLowRank, attach_factors, factors_of
from sparsebench.models import load_model, prunable_linears
from sparsebench.pipeline import prune_model
from sparsebench.pruners.oats import altern_ls, oats_rank
from sparsebench.sparsity import parse_pattern, project

from .conftest import TINY, run_cli, run_reload, tiny_spec


def _scaled_error(w, d, u, v, s):
    """|| W D - (S + U V) D ||_F: the objective in the scaled space the alternation works in."""
    return float(((w - s - u @ v) * d.sqrt()).norm())


def test_each_alternation_lowers_the_scaled_error():
    # L is the best rank-r fit to W D - S, S the best row-sparse fit to W D - L: neither step
    # can raise the error, so it is non-increasing over the iterations
    torch.manual_seed(0)
    w, d = torch.randn(24, 40), torch.rand(40) + 0.1
    errors = [
        _scaled_error(w, d, *altern_ls(w, d, k, rank=4, sparse_share=0.6)[:3]) for k in range(1, 9)
    ]
    assert all(b <= a * (1 + 1e-5) for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


def test_rank_zero_with_flat_statistics_is_magnitude_per_row():
    torch.manual_seed(1)
    w = torch.randn(8, 32)
    u, v, s, keep = altern_ls(w, torch.ones(32), 3, rank=0, sparse_share=0.5)
    assert u.shape == (8, 0) and v.shape == (0, 32)
    assert torch.equal(keep, project(w.abs(), 0.5, parse_pattern("unstructured"), "row"))
    assert torch.equal(s, w * keep)


def test_the_released_counts():
    torch.manual_seed(2)
    w, d = torch.randn(16, 48), torch.rand(48) + 0.5
    assert oats_rank(0.25, 0.5, 16, 48) == int(0.25 * 0.5 * 16 * 48 / 64) == 1
    u, v, s, keep = altern_ls(w, d, 4, rank=3, sparse_share=0.625)
    assert (keep.sum(1) == 48 - int(48 * 0.625)).all()  # int(cols x share) zeros in every row
    assert not s[~keep].any() and u.shape == (16, 3) and v.shape == (3, 48)
    _, _, s, keep = altern_ls(w, d, 4, rank=3, sparse_share=0.5, nm=(2, 4))
    assert (keep.reshape(16, 12, 4).sum(-1) == 2).all() and not s[~keep].any()


def test_a_column_no_token_reached_is_zero_not_nan():
    torch.manual_seed(3)
    d = torch.rand(32) + 0.1
    d[5] = 0
    u, v, s, _ = altern_ls(torch.randn(8, 32), d, 3, rank=2, sparse_share=0.5)
    assert torch.isfinite(s).all() and torch.isfinite(v).all()
    assert not s[:, 5].any() and not v[:, 5].any()


@pytest.fixture
def pruned():
    model, tok = load_model(tiny_spec("llama"), seed=0)
    calib = torch.randint(0, 256, (4, 32))
    out = prune_model(
        model, tok, method="oats", sparsity=0.5, calib=calib, seqlen=32, options={"num_iters": 3}
    )
    return model, out


def test_every_linear_is_sparse_plus_lowrank_with_the_released_shares(pruned):
    model, out = pruned
    linears = prunable_linears(model)
    assert linears and all(isinstance(m, SparsePlusLowRank) for m in linears.values())
    # row-major factors, as an export stores them (the run evaluates what a reload does)
    assert all(m.lowrank_v.is_contiguous() for m in linears.values())
    kept = factors = total = 0
    for name, lin in linears.items():
        rows, cols = lin.weight.shape
        assert lin.rank == int(0.25 * (1 - 0.5) * (rows * cols) / (rows + cols))
        zeros_per_row = (~out.masks[name]).sum(1)
        assert (zeros_per_row == int(cols * (1.0 - (1.0 - 0.25) * 0.5))).all()
        assert not lin.weight[~out.masks[name]].any()
        x = torch.randn(3, cols)
        want = x @ lin.weight.t() + (x @ lin.lowrank_v.t()) @ lin.lowrank_u.t()
        assert torch.allclose(lin(x), want, atol=1e-5)
        assert torch.allclose(lin(x), x @ lin.merged().t(), atol=1e-5)
        kept += int(out.masks[name].sum())
        factors += lin.lowrank_u.numel() + lin.lowrank_v.numel()
        total += rows * cols
    sp = out.sparsity
    assert sp["split"]["sparse_kept_params"] == kept and sp["split"]["lowrank_params"] == factors
    assert sp["actual_sparsity"] == (total - kept - factors) / total
    assert sp["removed_params"] == total - kept - factors
    assert sp["pruned_params"] == total - kept  # the zeros of S (nonzero_params' term)
    assert 0.5 <= sp["actual_sparsity"] < 0.55  # the ranks are floored


def test_the_speed_measurement_adds_the_thin_products_and_compares_with_the_merged_weight(pruned):
    from sparsebench.evaluation.speed import SpeedSpec, measure

    model, _ = pruned
    name, lin = next(iter(prunable_linears(model).items()))
    sparse = SparseLinear(lin, "scipy_csr", "scipy_csr")
    x = torch.randn(5, lin.in_features)
    assert torch.allclose(sparse(x), lin(x), atol=1e-5)
    assert sparse.bytes > lin.lowrank_u.numel() * 4 + lin.lowrank_v.numel() * 4
    spec = SpeedSpec(
        enabled=True, kernels=("scipy_csr",), batch_sizes=(1,), decode_tokens=2, repeats=1
    )
    out = measure(
        model, list(prunable_linears(model)), 32, torch.device("cpu"), "unstructured", spec
    )
    assert out["lowrank"]["linears"] == len(prunable_linears(model))
    assert out["sparse"]["sparse_calls"] > 0
    assert out["sparse"]["logits_max_abs_diff"] < 1e-3 * max(1.0, out["sparse"]["logits_max_abs"])
    assert isinstance(model.get_submodule(name), SparsePlusLowRank)  # put back


@pytest.mark.models  # a CLI run, an export and its reload: make test-models
@pytest.mark.parametrize("fmt", ["dense", "bitmask"])
def test_an_export_keeps_the_factors_and_reloads_to_the_same_model(fmt, tmp_path):
    first = run_cli(
        TINY + ["method=oats", "method.num_iters=3", "save.enabled=true", f"save.format={fmt}"],
        tmp_path / "a",
    )
    folder = tmp_path / "a" / "model"
    assert (folder / "sparsebench_lowrank.safetensors").is_file()
    again = run_reload(tmp_path / "a", tmp_path / "b")
    assert again["metrics"]["wikitext2"] == first["metrics"]["wikitext2"]
    assert again["sparsity"]["actual_sparsity"] == first["sparsity"]["actual_sparsity"]
    assert again["size"]["lowrank_factors"] == first["size"]["lowrank_factors"] > 0
    # through sparsebench the factors come back; a plain transformers load has S alone
    from transformers import AutoModelForCausalLM

    from sparsebench.models import ModelSpec

    ours, _ = load_model(ModelSpec(name="x", source="local", path=str(folder), seqlen=64), 0)
    assert len(factors_of(ours)) == len(prunable_linears(ours))
    if fmt == "dense":
        plain = AutoModelForCausalLM.from_pretrained(folder)
        name, lin = next(iter(factors_of(ours).items()))
        assert torch.equal(plain.get_submodule(name).weight, lin.weight)
        assert not factors_of(plain)
    bare = tmp_path / "bare"
    bare.mkdir()
    assert attach_factors(nn.Linear(2, 2), bare) == 0
    (bare / "sparsebench_lowrank.safetensors").write_bytes(b"not a file")
    with pytest.raises(Exception, match="unreadable"):
        attach_factors(ours, bare)


def test_nm_owl_and_the_recorded_compression_from_the_cli(tmp_path):
    nm = run_cli(TINY + ["method=oats", "method.num_iters=2", "pattern=2:4"], tmp_path / "nm")
    # released N:M: S is 2:4 and the factors get rank_ratio of (N/M) / (1 - rank_ratio)
    assert nm["sparsity"]["split"]["sparse_part_sparsity"] == 0.5
    assert nm["sparsity"]["actual_sparsity"] > 1 - 0.5 / 0.75 - 1e-9
    owl = run_cli(
        TINY + ["method=oats", "method.num_iters=2", "schedule=owl", "sparsity=0.7"],
        tmp_path / "owl",
    )
    targets = owl["allocation"]["targets"]
    assert len(set(targets)) > 1
    assert abs(owl["sparsity"]["actual_sparsity"] - 0.7) < 0.05
    assert owl["method_report"]["lowrank"]["rank_ratio"] == 0.25


@pytest.mark.parametrize(
    "extra, says",
    [
        (["method.rank_ratio=1.0"], "rank_ratio"),
        (["method.num_iters=0"], "num_iters"),
        (["quant=gptq"], "low-rank factors"),
        (["refine=dsnot"], "low-rank factors"),
    ],
)
def test_bad_input_is_refused_before_any_work(extra, says, tmp_path, capsys):
    from sparsebench import cli

    with pytest.raises(SystemExit) as err:
        cli.main(TINY + ["method=oats", *extra, f"hydra.run.dir={tmp_path / 'run'}"])
    assert err.value.code
    assert says in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_memory_plan_holds_the_decomposition_and_the_factors():
    from sparsebench.launch import memory_plan
    from sparsebench.specs import build_specs

    from .conftest import compose

    plan, shapes, _ = memory_plan(build_specs(compose(TINY + ["method=oats"])), 1)
    terms = {t["component"]: t["bytes"] for t in plan.as_dict()["terms"]}
    rows, cols = shapes.largest_linear
    assert terms["prune copies: one linear's decomposition (8 float32 copies), masks"] == (
        rows * cols * (8 * 4 + 2)
    )
    gains = terms["low-rank factors the pruned model gains"]
    assert gains == pytest.approx(shapes.prunable * 0.25 * shapes.dtype_bytes, abs=1)
