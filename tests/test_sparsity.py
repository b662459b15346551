import pytest
import torch

from sparsebench.errors import SparsebenchError
from sparsebench.sparsity import (
    Pattern,
    Ramp,
    check_sparsity,
    expected_pruned,
    nm_keep,
    parse_pattern,
    project,
    pruned_bounds,
)


def test_parse_pattern():
    assert parse_pattern("unstructured") == Pattern()
    assert parse_pattern("2:4") == Pattern(2, 4)
    assert parse_pattern(" 4:8 ") == Pattern(4, 8)
    assert str(Pattern(2, 4)) == "2:4" and not Pattern().is_nm


@pytest.mark.parametrize("bad", ["3:4", "1:4", "2:8", "0:0", "half", "2-4"])
def test_parse_pattern_rejects(bad):
    with pytest.raises(SparsebenchError, match="2:4"):
        parse_pattern(bad)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "x"])
def test_sparsity_range(bad):
    with pytest.raises(SparsebenchError, match=r"\[0, 1\)"):
        check_sparsity(bad, Pattern())


def test_nm_needs_half():
    assert check_sparsity(0.5, Pattern(2, 4)) == 0.5
    with pytest.raises(SparsebenchError, match="fixes sparsity at 0.5"):
        check_sparsity(0.7, Pattern(2, 4))


def test_project_tensor_known_answer():
    score = torch.tensor([[4.0, 1.0, 3.0], [0.5, 6.0, 2.0]])
    keep = project(score, 0.5, Pattern(), "tensor")  # int(6 * 0.5) = 3 lowest: 0.5, 1, 2
    assert keep.tolist() == [[True, False, True], [False, True, False]]


def test_project_row_known_answer():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.1, 0.2, 9.0, 8.0]])
    keep = project(score, 0.5, Pattern(), "row")
    assert keep.tolist() == [[True, False, True, False], [False, False, True, True]]


def test_project_block_counts():
    score = torch.rand(5, 10)
    keep = project(score, 0.3, Pattern(), "block:4")  # blocks of width 4, 4, 2
    assert [int((~keep[:, c : c + 4]).sum()) for c in (0, 4, 8)] == [6, 6, 3]
    assert int((~keep).sum()) == expected_pruned((5, 10), 0.3, Pattern(), "block:4") == 15


def test_project_block_official_count():
    # "block:B+1": the official SparseGPT cut, score <= the k-th smallest (0-based), k+1 per block
    score = torch.rand(5, 10)
    keep = project(score, 0.3, Pattern(), "block:4+1")
    for c, w in ((0, 4), (4, 4), (8, 2)):
        blk = score[:, c : c + w]
        k = int(blk.numel() * 0.3)
        assert torch.equal(~keep[:, c : c + w], blk <= blk.flatten().sort().values[k])
    assert int((~keep).sum()) == expected_pruned((5, 10), 0.3, Pattern(), "block:4+1") == 18
    assert project(score, 0.0, Pattern(), "block:4+1").all()  # sparsity 0 stays dense
    # ties at the threshold all go, as with the official `<=`; the bounds allow them
    tied = torch.tensor(
        [[1.0, 2.0, 2.0, 2.0], [3.0, 4.0, 5.0, 6.0]]
    )  # k = int(8 * 0.25) = 2 -> value 2.0
    keep = project(tied, 0.25, Pattern(), "block:4+1")
    assert keep.tolist() == [[False, False, False, False], [True, True, True, True]]
    assert pruned_bounds((2, 4), 0.25, Pattern(), "block:4+1") == (3, 4)
    assert pruned_bounds((5, 10), 0.3, Pattern(), "block:4") == (15, 15)
    assert expected_pruned((2, 2), 0.9, Pattern(), "block:2+1") == 4  # capped at the block size


@pytest.mark.parametrize("group", ["tensor", "row", "block:128", "block:128+1"])
@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.7, 0.9, 0.99])
def test_project_exact_count(group, s):
    score = torch.randn(33, 300)
    keep = project(score, s, Pattern(), group)
    assert int((~keep).sum()) == expected_pruned((33, 300), s, Pattern(), group)


def test_ties_are_exact_and_deterministic():
    score = torch.ones(8, 8)
    a, b = project(score, 0.5, Pattern(), "tensor"), project(score, 0.5, Pattern(), "tensor")
    assert int((~a).sum()) == 32 and torch.equal(a, b)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_valid(n, m):
    score = torch.randn(16, 64)
    keep = project(score, 0.5, Pattern(n, m))
    groups = keep.view(16, -1, m)
    assert (groups.sum(-1) == n).all()
    # the kept ones are the largest of each group
    kept_min = torch.where(groups, score.view(16, -1, m), torch.inf).amin(-1)
    pruned_max = torch.where(~groups, score.view(16, -1, m), -torch.inf).amax(-1)
    assert (kept_min >= pruned_max).all()


def test_nm_known_answer():
    score = torch.tensor([[1.0, 5.0, 3.0, 2.0, 9.0, 8.0, 0.0, 7.0]])
    assert nm_keep(score, 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]


def test_nm_ties_broken_as_the_official_group_loop():
    # The official code prunes topk(largest=False) of each M-column slice; keeping the top N
    # instead decides ties differently. Small integers make ties in most groups.
    torch.manual_seed(0)
    score = torch.randint(0, 3, (64, 32)).float()
    for n, m in ((2, 4), (4, 8)):
        prune = torch.zeros_like(score, dtype=torch.bool)
        for c in range(0, score.shape[1], m):
            prune.scatter_(
                1, c + torch.topk(score[:, c : c + m], m - n, dim=1, largest=False)[1], True
            )
        assert torch.equal(nm_keep(score, n, m), ~prune)


def test_nm_requires_divisible_columns():
    with pytest.raises(SparsebenchError, match="divisible by 4"):
        nm_keep(torch.randn(2, 6), 2, 4)


def test_cubic_ramp():
    r = Ramp(kind="cubic", initial=0.5, start=0.0, end=0.5)
    assert r.at(0, 100, 0.9) == pytest.approx(0.5)
    assert r.at(25, 100, 0.9) == pytest.approx(0.9 - 0.4 * 0.5**3)
    assert r.at(50, 100, 0.9) == pytest.approx(0.9) and r.at(99, 100, 0.9) == pytest.approx(0.9)
    assert Ramp().at(0, 100, 0.7) == 0.7
    with pytest.raises(SparsebenchError, match="ramp"):
        Ramp(kind="linear")


def test_project_accepts_a_non_contiguous_score():
    # a transposed view (weights set as `.data = x.T`, as some released code does) projects as its
    # copy
    import torch

    from sparsebench.sparsity import Pattern, project

    score = torch.rand(48, 64).T
    for group in ("tensor", "row", "block:16+1"):
        assert torch.equal(
            project(score, 0.7, Pattern(), group),
            project(score.contiguous(), 0.7, Pattern(), group),
        )
