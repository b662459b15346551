"""DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training: Training-Free Fine-tuning for
Sparse LLMs"): prune-and-grow swaps inside each row of a mask, no weight update.

Each linear's reconstruction error is estimated from the mean of its input: the pruned
weights' W_ij x E[sum_t x_tj] summed per row. Each cycle, in every row whose |error| exceeds
`update_threshold`, one pruned weight grows back (the one whose metric, divided by its input's
variance to the power `pow_of_var_regrowing`, lies at the end of the order that reduces the
error) and one kept weight goes (unstructured: among the kept, negative metrics first in
order of Wanda's score, then positive ones from the other end; N:M: the lowest score of the
regrown weight's group of M), for at most `max_cycle_time` cycles; a row stops for good once
a swap would not help (and, with `without_same_sign=false`, once it would flip the error's
sign). Every row (every group of M) keeps its count.

Taken from the released code (zyxxmu/DSnoT, lib/prune.py `prune_DSnoT`, lib/layerwrapper.py)
with its defaults and statistics, operation for operation. One difference, where the released
loop runs off its candidates (only on rows shorter than its cycle count, or when a group of
M is chosen twice): there it would grow a kept weight, prune a pruned one or read past the
row; here the row stops instead, so every count stays exact. On the models the paper prunes
(thousands of columns, 50 cycles) the two never differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import option
from . import REFINEMENTS, Refinement


class InputMoments:
    """What DSnoT reads of a linear's input, accumulated as the released WrappedGPT does:
    per column the mean and the (biased) variance over tokens, pooled by token counts; the
    running means over windows of the column sums (`sum_row`) and of the squared norms
    (`norms`, Wanda's statistic), rescaled by one window count."""

    def __init__(self, columns: int, device: torch.device):
        self.mean = torch.zeros(columns, 1, device=device)
        self.var = torch.zeros(columns, 1, device=device)
        self.tokens = 0
        self.windows = 0
        self.norms = torch.zeros(columns, device=device)
        self.sum_row = torch.zeros(columns, device=device)

    def add(self, x: torch.Tensor) -> None:
        batch = x.shape[0] if x.dim() == 3 else 1
        inp = x.reshape(-1, x.shape[-1]).t().float()  # (columns, tokens), as released
        mean = inp.mean(dim=1, keepdim=True)
        var = inp.var(dim=1, unbiased=False, keepdim=True)
        n = inp.shape[1]
        if self.tokens == 0:
            self.mean, self.var = mean, var
        else:
            self.var = (self.var * self.tokens + var * n) / (self.tokens + n)
            self.mean = (self.mean * self.tokens + mean * n) / (self.tokens + n)
        self.tokens += n
        self.norms *= self.windows / (self.windows + batch)
        self.sum_row *= self.windows / (self.windows + batch)
        self.windows += batch
        self.norms += torch.norm(inp, p=2, dim=1) ** 2 / self.windows
        self.sum_row += torch.sum(inp, dim=1) / self.windows


def _pick(order, ptr, side, length):
    """The candidate of each row at its pointer on `side` (0: from the start of its order,
    1: from the end), and whether the pointer is still inside the row's first `length`
    entries."""
    here = ptr.gather(1, side)
    inside = (here >= 0) & (here < length)
    idx = order.gather(1, here.clamp(0, order.shape[1] - 1))
    return idx, inside


def _advance(ptr, side):
    step = torch.where(side == 0, torch.ones_like(side), -torch.ones_like(side))
    ptr.scatter_(1, side, ptr.gather(1, side) + step)


def _pointers(length: torch.Tensor) -> torch.Tensor:
    """(rows, 2): each row's walk from the start (0) and from the end (length - 1)."""
    return torch.stack([torch.zeros_like(length), length - 1], dim=1)


def _start(weight, pruned, moments):
    """(the released DSnoT_metric W_ij x E[sum_t x_tj], a copy of the prune mask, each row's
    estimated reconstruction error: the pruned weights' metric summed)."""
    metric = weight.float() * moments.sum_row.reshape((1, -1))
    pruned = pruned.clone()
    error = torch.where(pruned, metric, torch.zeros_like(metric)).sum(dim=1, keepdim=True)
    return metric, pruned, error


def _swap(pruned, error, cut, grow, cut_metric, grow_metric, update) -> None:
    """Where `update`: prune `cut` (a kept weight), grow `grow` (a pruned one), and move the
    row's error by their metrics; in place."""
    pruned.scatter_(1, cut, pruned.gather(1, cut) | update)
    pruned.scatter_(1, grow, pruned.gather(1, grow) & ~update)
    error += torch.where(update, cut_metric, torch.zeros_like(cut_metric))
    error -= torch.where(update, grow_metric, torch.zeros_like(grow_metric))


def regrowing_order(metric: torch.Tensor, pruned: torch.Tensor, var: torch.Tensor, power: float):
    """The pruned weights' metric (kept weights at 0) over var^power, sorted (stable) as the
    released code sorts it; and that order's values, for the candidates' signs."""
    regrow = torch.where(pruned, metric, torch.zeros_like(metric))
    if power:
        regrow = regrow / torch.pow(var.reshape((1, -1)), power)
    values, order = torch.sort(regrow, dim=1, stable=True)
    return order, values


def dsnot_unstructured(
    weight: torch.Tensor,
    pruned: torch.Tensor,
    moments: InputMoments,
    max_cycle_time: int = 50,
    update_threshold: float = 0.1,
    pow_of_var_regrowing: float = 1.0,
    without_same_sign: bool = True,
) -> torch.Tensor:
    """The refined prune mask (True: pruned) of one linear, every row's count kept."""
    metric, pruned, error = _start(weight, pruned, moments)
    sign0 = torch.sign(error)
    wanda = weight.float().abs() * torch.sqrt(moments.norms.reshape((1, -1)))
    grow_order, _ = regrowing_order(metric, pruned, moments.var, pow_of_var_regrowing)
    # the kept weights by Wanda's score, negatives first (ascending score), then those of
    # metric 0, then positives (descending score): the released return_reorder_indice
    rows, cols = metric.shape
    kept_order = torch.sort(wanda.masked_fill(pruned, float("inf")), dim=1, stable=True)[1]
    kept_metric = metric.gather(1, kept_order)
    still = ~pruned.gather(1, kept_order)
    position = torch.arange(cols, device=metric.device).expand_as(kept_metric)
    key = torch.where(kept_metric < 0, position, 3 * cols - position)
    key = torch.where(kept_metric == 0, torch.full_like(key, 2 * cols), key)
    key = torch.where(still, key, torch.full_like(key, 4 * cols))  # pruned ones: past the end
    prune_order = kept_order.gather(1, torch.sort(key, dim=1, stable=True)[1])
    kept = (~pruned).sum(dim=1, keepdim=True)
    everything = torch.full_like(kept, cols)
    g_ptr, p_ptr = _pointers(everything.squeeze(1)), _pointers(kept.squeeze(1))
    update = torch.ones_like(error, dtype=torch.bool)
    for _ in range(max_cycle_time):
        if not bool(update.any()):
            break
        g_side = (error > 0).long()
        grow, g_ok = _pick(grow_order, g_ptr, g_side, everything)
        _advance(g_ptr, g_side)
        p_side = (error < 0).long()
        cut, p_ok = _pick(prune_order, p_ptr, p_side, kept)
        _advance(p_ptr, p_side)
        grow_metric, cut_metric = metric.gather(1, grow), metric.gather(1, cut)
        after = error + cut_metric - grow_metric
        # only a pruned weight grows and only a kept one goes (where the released walk would
        # take another, it would change the row's count: the row stops instead)
        valid = g_ok & p_ok & pruned.gather(1, grow) & ~pruned.gather(1, cut)
        update = update & valid & (error.abs() > update_threshold)
        if not without_same_sign:
            update = update & (sign0 == torch.sign(after))
        _swap(pruned, error, cut, grow, cut_metric, grow_metric, update)
    return pruned


def dsnot_nm(
    weight: torch.Tensor,
    pruned: torch.Tensor,
    initial_metric: torch.Tensor,
    moments: InputMoments,
    m: int,
    max_cycle_time: int = 50,
    update_threshold: float = 0.1,
    pow_of_var_regrowing: float = 1.0,
) -> torch.Tensor:
    """The refined N:M prune mask of one linear: a regrown weight's own group of M loses its
    lowest-scoring kept weight (`initial_metric`, the method's score), so every group keeps N.
    The released N:M loop always applies the sign rule."""
    metric, pruned, error = _start(weight, pruned, moments)
    sign0 = torch.sign(error)
    grow_order, _ = regrowing_order(metric, pruned, moments.var, pow_of_var_regrowing)
    # pruned weights, and each weight once chosen to go, score inf (the released code's "max
    # + 1" over a row that holds inf): a group chooses among its kept weights only
    score = initial_metric.float().masked_fill(pruned, float("inf"))
    rows, cols = metric.shape
    everything = torch.full((rows, 1), cols, device=metric.device)
    g_ptr = _pointers(everything.squeeze(1))
    update = torch.ones_like(error, dtype=torch.bool)
    for _ in range(max_cycle_time):
        if not bool(update.any()):
            break
        g_side = (error > 0).long()
        grow, g_ok = _pick(grow_order, g_ptr, g_side, everything)
        start = grow - grow % m
        group = torch.arange(m, device=metric.device).reshape(1, -1) + start
        low, at = torch.topk(score.gather(1, group), 1, dim=1, largest=False)
        cut = at + start
        grow_metric, cut_metric = metric.gather(1, grow), metric.gather(1, cut)
        after = error + cut_metric - grow_metric
        # a group whose kept weights were all chosen before has no candidate left
        still_kept = torch.isfinite(low)
        valid = g_ok & still_kept & pruned.gather(1, grow)
        update = update & valid & (sign0 == torch.sign(after)) & (error.abs() > update_threshold)
        score.scatter_(1, cut, float("inf"))
        _swap(pruned, error, cut, grow, cut_metric, grow_metric, update)
        _advance(g_ptr, g_side)
    return pruned


# ----------------------------------------------------------------------------- the stage


ATTENTION_WORDS = ("attn", "attention")


def is_attention(name: str) -> bool:
    """A linear of the block's attention (its first name part says so: self_attn, attn,
    attention, self_attention); everything else is the MLP (experts included)."""
    return any(word in name.split(".")[0].lower() for word in ATTENTION_WORDS)


@REFINEMENTS.register("dsnot")
@dataclass
class DSnoT(Refinement):
    max_cycle_time: int = option(50, ge=0)
    update_threshold: float = option(0.1, ge=0)
    pow_of_var_regrowing: float = option(1.0, ge=0)
    # the released default: the MLP's linears keep their initial mask ("mlp"), or the
    # attention's ("attention"), or none is skipped ("none")
    skip: str = option("mlp", choices=("mlp", "attention", "none"))
    # the released default (an argparse type=bool that is true whatever is passed): the
    # unstructured loop does not stop a row whose error would change sign
    without_same_sign: bool = True
    init: str = option("auto", choices=("auto", "score", "mask"))

    def new_stats(self, columns, device):
        return InputMoments(columns, device)

    def add_batch(self, stats: InputMoments, x: torch.Tensor) -> None:
        stats.add(x)

    def skips(self, name: str) -> bool:
        if self.skip == "none":
            return False
        return is_attention(name) == (self.skip == "attention")

    def refine_linear(self, dense, keep, stats, score, pattern):
        options = dict(
            max_cycle_time=self.max_cycle_time,
            update_threshold=self.update_threshold,
            pow_of_var_regrowing=self.pow_of_var_regrowing,
        )
        if pattern.is_nm:
            initial = score if score is not None else dense.abs().float()
            return ~dsnot_nm(dense, ~keep, initial, stats, pattern.m, **options)
        return ~dsnot_unstructured(
            dense, ~keep, stats, without_same_sign=self.without_same_sign, **options
        )
