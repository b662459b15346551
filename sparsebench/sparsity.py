"""Sparsity patterns, the projection that turns scores into masks, and schedules.

What a mask means is defined here once: every method (one-shot or ADMM) turns a
score tensor into a keep-mask through `project`, and the verifier checks masks
against `expected_pruned`, so the two can never disagree.

Comparison groups (docs/methods.md): who competes with whom for survival.
  "tensor"      one threshold per weight tensor (magnitude, ADMM projection)
  "row"         each output row prunes int(in_features * s) (Wanda)
  "block:B"     each (rows x B) column block prunes int(rows * B * s) (SparseGPT, exact)
  "tensor+1"    RIA's released rule: the whole tensor as one "block:B+1" block
  "block:B+1"   the official SparseGPT rule: each block prunes every score <= its k-th
                smallest (0-based), k = int(rows * B * s): k+1 weights, more only when
                scores tie at that value (quantized checkpoints have repeated weights);
                the verifier allows a tie surplus of TIE_SURPLUS of the block
N:M patterns ignore the group: every run of M consecutive input columns of a
row keeps exactly N.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import SparsebenchError
from .registry import option

PATTERN_HELP = "'unstructured' or 'N:M' with N/M = 1/2 (2:4, 4:8)"


@dataclass(frozen=True)
class Pattern:
    n: int = 0  # kept per group (N:M only)
    m: int = 0  # group size (N:M only); 0 means unstructured

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def parse_pattern(text: str) -> Pattern:
    text = str(text).strip().lower()
    if text == "unstructured":
        return Pattern()
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match:
        raise SparsebenchError(f"unknown sparsity pattern '{text}'; valid: {PATTERN_HELP}")
    n, m = int(match.group(1)), int(match.group(2))
    if m <= 0 or 2 * n != m:
        raise SparsebenchError(
            f"pattern '{text}' prunes {0 if m <= 0 else (m - n) / m:.3g} of the weights; "
            f"N:M patterns must have ratio 0.5 ({PATTERN_HELP})"
        )
    return Pattern(n, m)


def check_sparsity(sparsity: float, pattern: Pattern) -> float:
    """Validate the target against the pattern; returns it as a float."""
    # A string ("0.5 " quoted on the command line) is an error, not a number read later.
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise SparsebenchError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise SparsebenchError(f"sparsity must be in [0, 1), got {sparsity}")
    if pattern.is_nm and abs(s - 0.5) > 1e-9:
        raise SparsebenchError(
            f"pattern {pattern} fixes sparsity at 0.5, got sparsity={sparsity}; "
            f"use sparsity=0.5 with N:M or pattern=unstructured"
        )
    return s


def _block_group(group: str) -> tuple[int, int]:
    """'block:B' -> (B, 0); 'block:B+1' -> (B, 1); 'tensor+1' -> (one block of any width, 1)."""
    if group == "tensor+1":
        return WHOLE, 1
    match = re.fullmatch(r"block:(\d+)(\+1)?", group)
    if not match:
        raise ValueError(f"not a block group: {group}")
    return int(match.group(1)), int(bool(match.group(2)))


def _block_count(rows: int, width: int, sparsity: float, extra: int) -> int:
    return min(int(rows * width * sparsity) + (extra if sparsity > 0 else 0), rows * width)


WHOLE = 2**62  # a block width no tensor reaches: the whole tensor is one block

# Ties at the k-th score are rare (a few weights per block in SmolLM2's Q4 weights); a
# surplus beyond this fraction of a block means something other than ties.
TIE_SURPLUS = 1e-3


def pruned_bounds(
    shape: tuple[int, int], sparsity: float, pattern: Pattern, group: str
) -> tuple[int, int]:
    """(fewest, most) pruned weights a mask of this shape may have: equal, except under
    the official SparseGPT rule ("block:B+1"), where ties may add up to TIE_SURPLUS."""
    want = expected_pruned(shape, sparsity, pattern, group)
    if pattern.is_nm or sparsity == 0 or not group.endswith("+1"):
        return want, want
    rows, cols = shape
    b, _ = _block_group(group)
    surplus = sum(max(1, int(rows * min(b, cols - c) * TIE_SURPLUS)) for c in range(0, cols, b))
    return want, min(want + surplus, rows * cols)


def count_rule(group: str, pattern: Pattern) -> str:
    """In words: how many weights each mask of a method prunes, so how the actual sparsity can
    differ from the target (results.json sparsity.count_rule, the report's "actual" note)."""
    if pattern.is_nm:
        return f"{pattern.m - pattern.n} of every {pattern.m} along each row: exactly the target"
    if group == "tensor":
        return "int(weights x s) per linear: below the target by less than one weight per linear"
    if group == "row":
        return "int(columns x s) per row: below the target by less than one weight per row"
    b, extra = _block_group(group)
    if not extra:
        return (
            f"int(weights x s) per {b}-column block: below the target by less than one weight "
            "per block"
        )
    if b == WHOLE:
        return (
            "the released threshold rule: every score <= the k-th smallest, k = int(weights x "
            "s) per linear, i.e. one weight more than int(weights x s) per linear plus any "
            f"weights tied at the threshold (at most {TIE_SURPLUS:g} of a linear): above the "
            "target by about one weight per linear (method.per_row=true: int(columns x s) per row)"
        )
    return (
        f"SparseGPT's official count: every score <= the k-th smallest, k = int(weights x s) per "
        f"{b}-column block, i.e. one weight more than int(weights x s) per block plus any "
        f"weights tied at the threshold (at most {TIE_SURPLUS:g} of a block): above the target "
        "by about one weight per block (method.count=exact: below it by less than one)"
    )


def expected_pruned(shape: tuple[int, int], sparsity: float, pattern: Pattern, group: str) -> int:
    """Number of pruned weights a mask of this shape must have (the fewest, for "block:B+1")."""
    rows, cols = shape
    if pattern.is_nm:
        return rows * (cols // pattern.m) * (pattern.m - pattern.n)
    if group == "tensor":
        return int(rows * cols * sparsity)
    if group == "row":
        return rows * int(cols * sparsity)
    b, extra = _block_group(group)
    return sum(_block_count(rows, min(b, cols - c), sparsity, extra) for c in range(0, cols, b))


def nm_keep(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores of every M consecutive input columns of each row.

    Done as the official Wanda/SparseGPT code does it: prune the M - N lowest of each group
    (`topk(largest=False)`). Keeping the N highest differs only at ties, but ties are not
    rare (dequantized weights repeat values; pruned zeros tie), and one tie decided the
    other way changes every later block's inputs: 0.9% of a 2:4 mask of SmolLM2-135M.
    """
    rows, cols = score.shape
    if cols % m:
        raise SparsebenchError(
            f"N:M pattern {n}:{m} needs in_features divisible by {m}, got {cols}"
        )
    groups = score.reshape(rows, cols // m, m)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, False)
    return keep.reshape(rows, cols)


def _lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    # A stable sort makes tie-breaking identical on every device and run.
    return torch.sort(flat, dim=-1, stable=True).indices[..., :k]


def _lowest_flat_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k lowest entries of a 1-D tensor, ties broken by index (as a
    stable sort would), in O(n) with kthvalue instead of an O(n log n) sort."""
    prune = torch.zeros_like(flat, dtype=torch.bool)
    if k <= 0:
        return prune
    thr = torch.kthvalue(flat, k).values
    prune = flat < thr
    missing = k - int(prune.sum())
    if missing > 0:
        ties = torch.nonzero(flat == thr).flatten()[:missing]
        prune[ties] = True
    return prune


def project(
    score: torch.Tensor, sparsity: float, pattern: Pattern, group: str = "tensor"
) -> torch.Tensor:
    """Keep-mask (bool, same shape as score) pruning the lowest-scoring weights.

    Exactly `expected_pruned(score.shape, ...)` entries are False (for "block:B+1", within
    `pruned_bounds`: ties at the threshold all go, as in the official SparseGPT code).
    """
    score = score.float()
    if pattern.is_nm:
        return nm_keep(score, pattern.n, pattern.m)
    rows, cols = score.shape
    keep = torch.ones(
        score.shape, dtype=torch.bool, device=score.device
    )  # contiguous whatever score is
    if sparsity == 0:
        return keep
    if group == "tensor":
        keep.view(-1)[_lowest_flat_mask(score.reshape(-1), int(score.numel() * sparsity))] = False
    elif group == "row":
        keep.scatter_(1, _lowest(score, int(cols * sparsity)), False)
    else:
        b, extra = _block_group(group)
        for c in range(0, cols, b):
            block = score[:, c : c + b]
            k = _block_count(rows, block.shape[1], sparsity, extra)
            if extra:  # official: everything <= the (k+1)-th smallest value, ties included
                keep[:, c : c + b] = block > torch.kthvalue(block.reshape(-1), k).values
                continue
            sub = torch.ones_like(block, dtype=torch.bool)
            sub.view(-1)[_lowest(block.reshape(-1), k)] = False
            keep[:, c : c + b] = sub
    return keep


@dataclass(frozen=True)
class Ramp:
    """Sparsity target over optimisation steps (used by iterative methods).

    constant: the target from step 0.
    cubic:    gradual magnitude pruning (Zhu & Gupta 2017):
              s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3 for t in [t0, t1].
    """

    kind: str = option("constant", choices=("constant", "cubic"))
    initial: float = option(0.0, ge=0, lt=1)
    start: float = option(0.0, ge=0, le=1)  # fraction of total steps where the ramp starts
    end: float = option(0.5, ge=0, le=1)  # fraction of total steps where the target is reached

    def __post_init__(self):
        if self.kind not in ("constant", "cubic"):
            raise SparsebenchError(f"unknown ramp '{self.kind}'; valid: constant, cubic")
        if self.kind == "cubic":
            if not (0.0 <= self.start < self.end <= 1.0):
                raise SparsebenchError(
                    f"cubic ramp needs 0 <= start < end <= 1, got {self.start}, {self.end}"
                )
            if not (0.0 <= self.initial < 1.0):
                raise SparsebenchError(
                    f"ramp initial sparsity must be in [0, 1), got {self.initial}"
                )

    def at(self, step: int, total_steps: int, target: float) -> float:
        if self.kind == "constant":
            return target
        t0, t1 = self.start * total_steps, self.end * total_steps
        if step <= t0:
            return min(self.initial, target)
        if step >= t1:
            return target
        frac = (step - t0) / (t1 - t0)
        return target + (min(self.initial, target) - target) * (1.0 - frac) ** 3


ALLOCATIONS = ("uniform", "owl", "evopress")


@dataclass(frozen=True)
class EvoPressSearch:
    """EvoPress's level database and search (sparsebench/evopress.py); the released defaults
    (IST-DASLab/EvoPress scripts/run_prune_search.sh, prune.py)."""

    num_levels: int = option(8, ge=1)  # levels above and below the target per linear
    weights_diff: int = option(0, ge=0)  # weights one level moves; 0: int(0.5 min(s, 1-s) / L h^2)
    generations: int = option(400, ge=0)  # 0: the database's uniform levels (the control)
    offspring: int = option(64, ge=1)
    survivors: tuple[int, ...] = (8, 2, 1)  # kept after each selection stage (the last: 1)
    tokens: tuple[int, ...] = (2048, 16384, 65536)  # calibration tokens of each stage
    kl_windows: int = option(0, ge=0)  # calibration windows the search draws from; 0: all
    max_level: int = option(99999, ge=1)  # |level| allowed
    max_total_deviation: int = option(99999, ge=1)  # sum of |level| allowed

    def __post_init__(self):
        if len(self.survivors) != len(self.tokens) or not self.survivors:
            raise SparsebenchError(
                f"schedule.evopress: survivors {list(self.survivors)} and tokens "
                f"{list(self.tokens)} must name the same stages (one entry each)"
            )
        if self.survivors[-1] != 1 or any(s < 1 for s in self.survivors):
            raise SparsebenchError(
                f"schedule.evopress.survivors={list(self.survivors)}: each stage keeps >= 1 and "
                "the last keeps 1 (the next parent)"
            )
        if any(t < 1 for t in self.tokens):
            raise SparsebenchError(f"schedule.evopress.tokens={list(self.tokens)}: each >= 1")


@dataclass(frozen=True)
class OWL:
    """Outlier-weighted layer-wise sparsity (Yin et al., ICML 2024), published defaults.

    A block's outlier ratio is the share of its Wanda scores |W_ij| * ||X_j|| above `m`
    times the block's mean score; the ratios are scaled to a spread of 2 * lam and
    centred on the target, so blocks with more outliers keep more weights.
    """

    m: float = option(5.0, gt=0)  # outlier threshold, in multiples of the block's mean score
    lam: float = option(0.08, ge=0, lt=1)  # block targets lie within target +/- lam
    # false (default): the released code's targets, so OWL + Wanda reproduces its masks.
    # true: each block's target is nudged (by < 0.001 here) so the pruned count so far tracks
    # the exact total; at 0.7 on SmolLM2-135M that alone moved WikiText-2 by 8% (docs/results.md).
    balance: bool = False


@dataclass(frozen=True)
class Schedule:
    """The sparsity schedule group: how the target spreads over layers and steps."""

    allocation: str = option("uniform", choices=ALLOCATIONS)
    ramp: Ramp = Ramp()
    owl: OWL | None = None  # options of allocation=owl
    evopress: EvoPressSearch | None = None  # options of allocation=evopress

    def __post_init__(self):
        if self.allocation not in ALLOCATIONS:
            raise SparsebenchError(
                f"unknown allocation '{self.allocation}'; valid: {', '.join(ALLOCATIONS)}"
            )

    @property
    def needs_calibration(self) -> bool:
        """OWL scores blocks by the Wanda metric: it reads calibration windows for any method."""
        return self.allocation != "uniform"
