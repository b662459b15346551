"""Bounds for comparing two computations that may add in a different order.

Every numerical comparison in tests/ between such computations uses one of these, and each
says why it holds on any IEEE-754 CPU, whatever its vector width (ATen's `default`, `avx2`,
`avx512` kernels), BLAS dispatch (`MKL_CBWR`) or thread count (`make test-portable` runs
them under each):

- `identical`: the two sides run the same floating-point operations on the same operands,
  so they agree bit for bit whatever the kernels (no bound to loosen).
- `gamma(n)`: Higham's bound for a sum of n terms in float32: any order of summation is
  within gamma(n) = n u / (1 - n u) (u = 2^-24) of the exact sum, relative to the sum of
  the terms' magnitudes. Two orders of a sum of non-negative terms (a squared norm) are
  therefore within 2 gamma(n) of each other relative to the sum itself.
"""

from __future__ import annotations

import math

import torch

U32 = 2.0**-24  # float32 unit roundoff: one rounding moves a value by at most this, relatively


def gamma(n: int, u: float = U32) -> float:
    """Relative error bound of a sum of n float terms in any order (Higham, Thm 4.2)."""
    assert n * u < 1
    return n * u / (1 - n * u)


def norm_rel_bound(n: int) -> float:
    """Two float32 computations of the 2-norm of the same n numbers, in any orders, differ by
    at most this, relatively: each squares (one rounding each), sums n non-negative terms
    (gamma(n)) and takes a square root (halving the relative error, plus one rounding);
    the two errors can point in opposite directions."""
    one = 0.5 * (gamma(n) + U32) + U32
    return 2 * one


def assert_identical(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str = ""
) -> None:
    """Every tensor of a equals b's bit for bit (NaN-free; same keys)."""
    assert set(a) == set(b), (what, sorted(set(a) ^ set(b))[:5])
    for key, x in a.items():
        assert torch.equal(x, b[key]), (what, key, float((x.float() - b[key].float()).abs().max()))


def close_within(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)
