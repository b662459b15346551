import pytest
import torch
from torch import nn

from sparsebench.errors import SparsebenchError
from sparsebench.masks import apply_mask, summarize, verify
from sparsebench.sparsity import Pattern, project


def _pruned_linear(score_fn=torch.abs, s=0.5, pattern=Pattern(), group="row"):
    lin = nn.Linear(16, 8, bias=False)
    keep = project(score_fn(lin.weight.detach()), s, pattern, group)
    apply_mask(lin, keep)
    return lin, keep


def test_verify_accepts_and_reports():
    lin, keep = _pruned_linear()
    report = verify({"l": lin}, {"l": keep}, 0.5, Pattern(), "row")
    assert report == {"l": 0.5}
    assert summarize(report, {"l": lin}) == {
        "actual_sparsity": 0.5,
        "pruned_params": 64,
        "prunable_params": 128,
    }


def test_verify_catches_wrong_count():
    lin, keep = _pruned_linear(s=0.25)
    with pytest.raises(SparsebenchError, match="target 64"):
        verify({"l": lin}, {"l": keep}, 0.5, Pattern(), "row")


def test_verify_official_sparsegpt_count():
    # "block:8+1": k+1 = 33 of 64 per 8-column block (66 in all); ties may add up to 1 per block
    lin = nn.Linear(16, 8, bias=False)
    keep = project(lin.weight.detach().abs(), 0.5, Pattern(), "block:8+1")
    apply_mask(lin, keep)
    assert verify({"l": lin}, {"l": keep}, 0.5, Pattern(), "block:8+1") == {"l": 66 / 128}
    keep.view(-1)[torch.nonzero(keep.view(-1))[:2].flatten()] = False  # two tied extras: allowed
    apply_mask(lin, keep)
    verify({"l": lin}, {"l": keep}, 0.5, Pattern(), "block:8+1")
    keep.view(-1)[torch.nonzero(keep.view(-1))[:1].flatten()] = False  # a third: not a tie surplus
    apply_mask(lin, keep)
    with pytest.raises(SparsebenchError, match=r"target 66 plus at most 2 tied .*count=exact"):
        verify({"l": lin}, {"l": keep}, 0.5, Pattern(), "block:8+1")
    with pytest.raises(SparsebenchError, match="target 66 plus"):  # too few fails too
        verify(
            {"l": lin},
            {"l": project(lin.weight.detach().abs(), 0.5, Pattern(), "block:8")},
            0.5,
            Pattern(),
            "block:8+1",
        )


def test_verify_catches_weights_outside_mask():
    lin, keep = _pruned_linear()
    lin.weight.data[~keep] += 1.0
    with pytest.raises(SparsebenchError, match="outside the mask are non-zero"):
        verify({"l": lin}, {"l": keep}, 0.5, Pattern(), "row")


def test_verify_catches_bad_nm_group():
    lin, keep = _pruned_linear(pattern=Pattern(2, 4))
    keep = keep.clone()
    row = keep[0]
    row[:4] = torch.tensor([True, True, True, False])  # 3 of 4 kept in one group ...
    row[4:8] = torch.tensor([True, False, False, False])  # ... count stays right elsewhere
    lin.weight.data *= keep
    with pytest.raises(SparsebenchError, match="N:M group"):
        verify({"l": lin}, {"l": keep}, 0.5, Pattern(2, 4), "tensor")


def test_verify_requires_every_mask():
    lin, keep = _pruned_linear()
    with pytest.raises(SparsebenchError, match="no mask"):
        verify({"l": lin, "m": lin}, {"l": keep}, 0.5, Pattern(), "row")
