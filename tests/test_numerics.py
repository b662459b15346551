"""The derived bounds of tests/numerics.py hold where they should and reject what lies beyond."""

import torch

from .numerics import U32, close_within, gamma, norm_rel_bound


def test_reordered_float32_norms_stay_within_the_derived_bound():
    # heavy-tailed values over six decades: the sum of squares is added in very different orders
    torch.manual_seed(0)
    x = (
        torch.randn(100_000, dtype=torch.float64)
        * torch.exp(torch.randn(100_000, dtype=torch.float64) * 3)
    ).float()
    exact = float(x.double().pow(2).sum().sqrt())
    orders = [
        x,
        x.flip(0),
        x[torch.randperm(x.numel())],
        x.sort().values,
        x.view(10, -1).t().contiguous().view(-1),
    ]
    norms = [float(v.norm()) for v in orders] + [
        float(torch.stack([c.norm() for c in x.split(999)]).norm())
    ]
    bound = norm_rel_bound(x.numel())
    for n in norms:
        assert close_within(
            n, exact, bound / 2
        )  # each within half the two-sided bound of the exact norm
    for a in norms:
        for b in norms:
            assert close_within(a, b, bound)


def test_the_bounds_reject_an_error_just_beyond_them():
    n = 106_816
    bound = norm_rel_bound(n)
    assert close_within(1.0, 1.0 + 0.99 * bound, bound)
    assert not close_within(1.0, 1.0 + 1.01 * bound, bound)
    assert gamma(1) == U32 / (1 - U32) and gamma(2**20) < 0.07
