"""Known-answer tests of the one-shot methods on small matrices."""

import logging

import pytest
import torch
from torch import nn

from sparsebench.errors import SparsebenchError
from sparsebench.models import prunable_linears
from sparsebench.pruners import PruneContext
from sparsebench.pruners.magnitude import Magnitude
from sparsebench.pruners.sparsegpt import SparseGPT
from sparsebench.pruners.wanda import Wanda
from sparsebench.sparsity import Pattern, Schedule, expected_pruned


def _linear(weight):
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data.copy_(weight)
    return lin


def _prune_one(method, weight, x, s, pattern=Pattern()):
    lin = _linear(weight)
    stats = method.new_stats(weight.shape[1], torch.device("cpu"))
    method.add_batch(stats, x.unsqueeze(0))
    keep = method.prune_linear(lin, method.prepare(stats), s, pattern)
    lin.weight.data *= keep
    return lin.weight.detach(), keep


def test_wanda_known_answer():
    w = torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    x = torch.diag(torch.tensor([1.0, 10.0, 1.0, 10.0]))  # column norms 1, 10, 1, 10
    _, keep = _prune_one(Wanda(), w, x, 0.5)
    # scores: row 0 = [4, 10, 3, 20], row 1 = [1, 10, 1, 10]; magnitude alone would keep cols 0, 2
    assert keep.tolist() == [[False, True, False, True], [False, True, False, True]]


def test_wanda_norms_average_over_calls():
    # The running mean over forward calls gives the same ranking as one pass over all tokens.
    w = torch.randn(8, 32)
    xs = [torch.randn(5, 32) * torch.linspace(0.1, 3, 32) for _ in range(3)]
    lin = _linear(w)
    m = Wanda()
    stats = m.new_stats(32, torch.device("cpu"))
    for x in xs:
        m.add_batch(stats, x.unsqueeze(0))
    keep = m.prune_linear(lin, stats, 0.5, Pattern())
    ref = w.abs() * torch.cat(xs).norm(dim=0)
    ref_keep = torch.ones_like(keep)
    ref_keep.scatter_(1, ref.argsort(1)[:, :16], False)
    assert torch.equal(keep, ref_keep)


def test_magnitude_on_model(tiny_model):
    model, _ = tiny_model
    before = {n: lin.weight.detach().clone() for n, lin in prunable_linears(model).items()}
    masks = Magnitude().prune(PruneContext(model, 0.6, Pattern(), Schedule(), torch.device("cpu")))
    for name, lin in prunable_linears(model).items():
        keep, w0 = masks[name], before[name]
        assert int((~keep).sum()) == expected_pruned(tuple(w0.shape), 0.6, Pattern(), "tensor")
        assert w0.abs()[keep].min() >= w0.abs()[~keep].max()
        assert torch.equal(lin.weight.detach(), w0 * keep)
    assert "lm_head" not in " ".join(masks)


def sparsegpt_reference(w, x, s, pattern, blocksize, percdamp=0.01, extra=1):
    """Naive float64 OBS with an explicit inverse and Schur-complement eliminations.
    Unstructured blocks prune int(numel * s) + extra weights (official: +1)."""
    w = w.double().clone()
    rows, cols = w.shape
    H = 2 * x.double().t() @ x.double()
    H += percdamp * H.diag().mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    d2, Hr = [], Hinv.clone()
    for i in range(cols):
        d2.append(Hr[i, i].item())
        Hr = Hr - torch.outer(Hr[:, i], Hr[i, :]) / Hr[i, i]
    d2 = torch.tensor(d2, dtype=torch.float64)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    Hr = Hinv.clone()
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if not pattern.is_nm:
            score = (w[:, i1:i2] ** 2 / d2[i1:i2]).flatten()
            k = int(score.numel() * s) + extra
            block = torch.ones(score.numel(), dtype=torch.bool)
            block[score.argsort()[:k]] = False
            keep[:, i1:i2] = block.view(rows, i2 - i1)
        for i in range(i1, i2):
            if pattern.is_nm and (i - i1) % pattern.m == 0:
                score = w[:, i : i + pattern.m] ** 2 / d2[i : i + pattern.m]
                grp = torch.zeros_like(score, dtype=torch.bool)
                grp.scatter_(1, score.argsort(1, descending=True)[:, : pattern.n], True)
                keep[:, i : i + pattern.m] = grp
            q = w[:, i] * keep[:, i]
            err = (w[:, i] - q) / Hr[i, i]
            w[:, i + 1 :] -= torch.outer(err, Hr[i, i + 1 :])
            w[:, i] = q
            Hr = Hr - torch.outer(Hr[:, i], Hr[i, :]) / Hr[i, i]
    return w, keep


@pytest.mark.parametrize("count", ["official", "exact"])
@pytest.mark.parametrize(
    "pattern,s", [(Pattern(), 0.5), (Pattern(), 0.7), (Pattern(2, 4), 0.5), (Pattern(4, 8), 0.5)]
)
def test_sparsegpt_matches_naive_obs(pattern, s, count):
    torch.manual_seed(0)
    x = torch.randn(96, 24) @ torch.randn(24, 24)  # correlated inputs
    w = torch.randn(6, 24)
    method = SparseGPT(blocksize=8, count=count)
    got, keep = _prune_one(method, w, x, s, pattern)
    ref, ref_keep = sparsegpt_reference(
        w, x, s, pattern, blocksize=8, extra=int(count == "official")
    )
    assert int((~keep).sum()) == expected_pruned((6, 24), s, pattern, method.group)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("pattern,s", [(Pattern(), 0.5), (Pattern(2, 4), 0.5)])
def test_sparsegpt_group_sweep_equals_one_sweep_per_linear(pattern, s):
    # q/k/v share a Hessian and are swept as one stacked matrix; the result must be each
    # linear's own sweep. Different scales: a threshold pooled over the stack would prune
    # the small linear far more than its share.
    torch.manual_seed(2)
    x = torch.randn(96, 24) @ torch.randn(24, 24)
    weights = [torch.randn(6, 24), 0.01 * torch.randn(10, 24), torch.randn(3, 24)]
    method = SparseGPT(blocksize=8)
    stats = method.new_stats(24, torch.device("cpu"))
    method.add_batch(stats, x.unsqueeze(0))
    prepared = method.prepare(stats)
    grouped = [_linear(w) for w in weights]
    keeps = method.prune_group(grouped, prepared, s, pattern)
    for w, lin, keep in zip(weights, grouped, keeps):
        alone = _linear(w)
        alone_keep = method.prune_linear(alone, prepared, s, pattern)
        assert torch.equal(keep, alone_keep)
        assert torch.equal(lin.weight, alone.weight)  # bitwise: the same operations per row
        assert int((~keep).sum()) == expected_pruned(tuple(w.shape), s, pattern, method.group)


def test_sparsegpt_orthogonal_inputs_is_magnitude():
    # H = 2 I: no cross-column correction, every d equal -> per-block magnitude, kept weights
    # untouched.
    w = torch.randn(4, 16)
    got, keep = _prune_one(SparseGPT(blocksize=8, percdamp=0.0 + 1e-9), w, torch.eye(16), 0.5)
    for c in (0, 8):
        blk = w[:, c : c + 8].abs()
        assert blk[keep[:, c : c + 8]].min() >= blk[~keep[:, c : c + 8]].max()
    torch.testing.assert_close(got, w * keep)


def test_sparsegpt_beats_wanda_on_reconstruction():
    torch.manual_seed(1)
    x = torch.randn(256, 64) @ torch.randn(64, 64)
    w = torch.randn(32, 64)
    errs = {}
    for name, method in [("sparsegpt", SparseGPT()), ("wanda", Wanda())]:
        got, _ = _prune_one(method, w, x, 0.5)
        errs[name] = (x @ (w - got).t()).norm().item()
    assert errs["sparsegpt"] < errs["wanda"]


def test_sparsegpt_dead_inputs_zeroed():
    x = torch.randn(40, 8)
    x[:, 3] = 0
    got, keep = _prune_one(SparseGPT(), torch.randn(4, 8) + 5, x, 0.25)
    assert (got[:, 3] == 0).all()


def test_sparsegpt_count_option():
    assert SparseGPT().group == "block:128+1" and SparseGPT(count="exact").group == "block:128"
    with pytest.raises(
        SparsebenchError, match=r"count must be one of \['official', 'exact'\], got 'round'"
    ):
        SparseGPT(count="round")


def test_sparsegpt_hessian_as_official():
    # H = 2 X X^T / n over all tokens of all calls, whatever the split into calls
    xs = [torch.randn(1, 7, 5), torch.randn(2, 3, 5)]
    stats = SparseGPT().new_stats(5, torch.device("cpu"))
    for x in xs:
        SparseGPT().add_batch(stats, x)
    flat = torch.cat([x.reshape(-1, 5) for x in xs]).double()
    torch.testing.assert_close(stats.value.double(), 2 * flat.t() @ flat / 3, rtol=1e-5, atol=1e-6)
    assert stats.nsamples == 3


def test_sparsegpt_retries_damping(caplog):
    stats = SparseGPT().new_stats(16, torch.device("cpu"))
    stats.value = torch.ones(
        16, 16
    )  # rank 1: tiny damping cannot make it positive definite in float32
    with pytest.raises(SparsebenchError, match="percdamp"):
        SparseGPT(percdamp=1e-30, damp_retries=0).prepare(stats)
    stats.value = torch.ones(16, 16)
    with caplog.at_level(logging.WARNING):
        U, dead = SparseGPT(percdamp=1e-30, damp_retries=40).prepare(stats)
    assert torch.isfinite(U).all() and not dead.any()
    assert "succeeded with percdamp" in caplog.text
