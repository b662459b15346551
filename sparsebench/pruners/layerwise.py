"""The one-shot methods' shared part: statistics of each linear's input, then one linear (or
one group of linears reading the same input) pruned at a time, block by block.

The block loop, the capture of a block's inputs and the statistics pass are the sequential
driver's (engine/driver.py); this file holds what a one-shot method declares: its statistic
(`new_stats`, `add_batch`), a per-input precomputation (`prepare`) and the pruning of a
linear (`prune_linear`) or of a group (`prune_group`). The statistics the official Wanda and
SparseGPT code keep (running means of ||X_j||^2 and of H = 2 X^T X / n) are here too.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import torch
from torch import nn

from ..engine.driver import Sequential, collect_statistics
from ..engine.gram import RunningMean, scaled_gram  # noqa: F401  (the methods' statistics)
from ..errors import SparsebenchError
from ..masks import apply_mask
from ..models import expert_of, is_expert
from ..plan import Terms
from ..sparsity import Pattern, project
from .base import PruneContext, Pruner

log = logging.getLogger(__name__)


class LayerwisePruner(Pruner):
    """A one-shot method: how to accumulate input statistics and prune one linear."""

    needs_calibration: ClassVar[bool] = True
    # The statistic the method keeps per block, for the memory plan (plan.Terms.stats: norms,
    # hessian, gram_eig, gram_inv); a method that declares none is refused by the plan.
    statistic: ClassVar[str | None] = None

    def plan_terms(self, device):
        return Terms("oneshot", stats=self.statistic) if self.statistic else None

    def refinable(self) -> "LayerwisePruner":
        return self

    def new_stats(self, columns: int, device: torch.device) -> Any:
        raise NotImplementedError

    def add_batch(self, stats: Any, x: torch.Tensor) -> None:
        """x: the linear's input for one forward call, shape (batch, tokens, columns)."""
        raise NotImplementedError

    def prepare(self, stats: Any) -> Any:
        """Per-distinct-input precomputation shared by linears that read the same input."""
        return stats

    def prune_linear(
        self, linear: nn.Linear, prepared: Any, sparsity: float, pattern: Pattern
    ) -> torch.Tensor:
        """Prune (and possibly update) linear.weight in place; return its keep mask."""
        raise NotImplementedError

    def pop_column_order(self, linear: nn.Linear) -> torch.Tensor | None:
        """The input-column order the method chose this linear's N:M groups in, if it
        permuted them (RIA's channel reallocation); None: consecutive columns."""
        return None

    # True for a method with a closed-form score of the dense weight (`score`)
    scored: ClassVar[bool] = False
    # the dtype of the blocks, their inputs and arguments during the walk (None: the model's);
    # a method that trains inside the walk (Wanda++'s regional optimization) asks for float32
    walk_dtype: ClassVar[torch.dtype | None] = None

    def score(self, linear: nn.Linear, prepared: Any) -> torch.Tensor | None:
        """The method's saliency of the (dense) weight, higher kept: where a refinement starts
        (refine/). None: the method has no closed-form score; its masks are the start."""
        return None

    def refine_start(self, refine) -> str:
        """Where a refinement starts: "score" (the score's lowest int(cols x s) per row, as
        the released DSnoT code starts) or "mask" (the method's own masks)."""
        return "score" if refine.init != "mask" and self.scored else "mask"

    @property
    def masks_group(self) -> str:
        """The comparison group of the masks this run makes (a refinement that starts from
        the score counts per row)."""
        refine = getattr(self, "refinement", None)
        if refine is not None and self.refine_start(refine) == "score":
            return "row"
        return self.group

    def prune_group(
        self, linears: list[nn.Linear], prepared: Any, sparsity: float, pattern: Pattern
    ) -> list[torch.Tensor]:
        """Prune linears that read the same input (q/k/v, gate/up); one keep mask each.
        Methods whose per-linear work can be done once for all of them override this."""
        return [self.prune_linear(linear, prepared, sparsity, pattern) for linear in linears]

    @torch.no_grad()
    def prune_block(
        self,
        block: nn.Module,
        inps: torch.Tensor,
        args,
        kwargs,
        sparsity: float,
        pattern: Pattern,
        batch: int = 1,
        scratch: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Prune one block in place from its inputs (`batch` windows per forward; 1 as the
        official code); return {linear name inside the block: keep mask} on the block's device.
        `scratch`: a buffer shaped like the inputs the method may use (the driver's output
        buffer, overwritten after the block's work)."""
        self.block_orders: dict[str, torch.Tensor] = {}
        refine = getattr(self, "refinement", None)
        new_stats, add_batch = self.new_stats, self.add_batch
        if refine is not None:  # the refinement's statistic, in the same pass
            new_stats = lambda c, d: (self.new_stats(c, d), refine.new_stats(c, d))  # noqa: E731
            add_batch = lambda st, x: (self.add_batch(st[0], x), refine.add_batch(st[1], x))  # noqa: E731
        linears, groups, stats, tokens, unused = collect_statistics(
            block, inps, args, kwargs, new_stats, add_batch, batch, who=self.name
        )
        masks: dict[str, torch.Tensor] = {}
        for leader, names in groups.items():
            own, moments = stats.pop(leader) if refine is not None else (stats.pop(leader), None)
            prepared = self.prepare(own)
            group = [linears[n] for n in names]
            if refine is None:
                keeps = self.prune_group(group, prepared, sparsity, pattern)
            else:
                keeps = self.refined(refine, names, group, prepared, moments, sparsity, pattern)
            for name, keep in zip(names, keeps):
                apply_mask(linears[name], keep)  # hard zeros even if a method's update left residue
                masks[name] = keep
                order = self.pop_column_order(linears[name])
                if order is not None:
                    self.block_orders[name] = order
        not_expert = [n for n in unused if not is_expert(n)]
        if not_expert:
            raise SparsebenchError(
                f"{self.name}: linears {not_expert} never ran in the block's forward, so they have "
                "no input statistics to prune with"
            )
        # An expert no calibration token was routed to has no statistic: the documented rule
        # (docs/models.md) prunes it by magnitude, in the method's comparison group, and the
        # run counts it (results.json method_report.moe.magnitude_fallback).
        for name in unused:
            keep = project(linears[name].weight.detach().abs(), sparsity, pattern, self.masks_group)
            apply_mask(linears[name], keep)
            masks[name] = keep
        self.last_tokens, self.last_fallback = tokens, unused
        return masks

    def refined(self, refine, names, group, prepared, moments, sparsity, pattern):
        """The group's masks, started from the method's scores or masks and refined."""
        from_score = self.refine_start(refine) == "score"
        scores = [self.score(lin, prepared) if from_score else None for lin in group]
        return refine_group(
            refine,
            names,
            group,
            moments,
            scores,
            lambda: self.prune_group(group, prepared, sparsity, pattern),
            sparsity,
            pattern,
        )

    @torch.no_grad()
    def prune(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        self.refinement = ctx.refine
        if ctx.refine is not None:
            ctx.refine.start()
        driver = Sequential(
            ctx.model,
            ctx.calib,
            ctx.device,
            ctx.inputs,
            ctx.calib_batch,
            dtype=self.walk_dtype,
            desc=f"{self.name} blocks",
        )
        masks: dict[str, torch.Tensor] = {}
        self._column_orders: dict[str, torch.Tensor] = {}
        self.moe: dict[str, Any] = {"routed_tokens": {}, "magnitude_fallback": []}
        for step in driver:
            block_masks = self.prune_block(
                step.block,
                step.inputs,
                step.args,
                step.kwargs,
                ctx.block_sparsity(step.index),
                ctx.pattern,
                ctx.calib_batch,
                scratch=step.outputs,
            )
            masks.update(
                {
                    f"{driver.path}.{step.index}.{name}": keep.cpu()
                    for name, keep in block_masks.items()
                }
            )
            self._column_orders.update(
                {f"{driver.path}.{step.index}.{n}": o.cpu() for n, o in self.block_orders.items()}
            )
            prefix = f"{driver.path}.{step.index}."
            for name in block_masks:  # tokens routed to each expert (its linears all see them)
                if is_expert(name):
                    expert = prefix + expert_of(name)
                    seen = self.last_tokens.get(name, 0)
                    self.moe["routed_tokens"][expert] = max(
                        self.moe["routed_tokens"].get(expert, 0), seen
                    )
            self.moe["magnitude_fallback"] += [prefix + n for n in self.last_fallback]
        return masks

    def report(self) -> dict[str, Any]:
        """A mixture of experts: the calibration tokens routed to each expert, and the experts
        pruned by magnitude because none was (docs/models.md); a refinement's counts."""
        moe = getattr(self, "moe", None)
        out: dict[str, Any] = {"moe": moe} if moe and moe["routed_tokens"] else {}
        refine = getattr(self, "refinement", None)
        if refine is not None:
            out["refine"] = {
                "name": refine.name,
                "start": self.refine_start(refine),
                **refine.report(),
            }
        return out


def refine_group(
    refinement,  # a refine.Refinement (duck-typed: pruners never import refine)
    names: list[str],
    linears: list[nn.Linear],
    stats: Any,
    scores: list[torch.Tensor | None],
    method_keeps,
    sparsity: float,
    pattern: Pattern,
) -> list[torch.Tensor]:
    """Refine the linears that read one input (their names inside the block): start from the
    scores' masks (lowest int(cols x s) per row; N:M per group) or, where a score is None, from
    `method_keeps()` (the method's own masks: it prunes, and may update, the weights); put the
    dense weights back under the refined masks (a skipped linear keeps its start, with the
    method's weights where the method pruned it). The time goes to the report."""
    dense = [lin.weight.detach().clone() for lin in linears]
    from_scores = all(s is not None for s in scores)
    if from_scores:
        keeps = [project(s, sparsity, pattern, "row") for s in scores]
    else:
        keeps = method_keeps()
    start = time.perf_counter()
    out = []
    for name, linear, weight, keep, score in zip(names, linears, dense, keeps, scores):
        if refinement.skips(name):
            refinement.tally(skipped=1)
            if from_scores:
                linear.weight.data.copy_(weight)
            out.append(keep)
            continue
        refined = refinement.refine_linear(weight, keep, stats, score, pattern)
        refinement.tally(refined=1, swaps=int((refined & ~keep).sum()))
        linear.weight.data.copy_(weight)  # no weight update: the dense values, refined mask
        out.append(refined)
    refinement.tally(seconds=time.perf_counter() - start)
    return out


class GramPruner(LayerwisePruner):
    """A one-shot method on the layer's Gram matrix H = 2 X^T X / n (SparseGPT, ALPS, L-ADMM):
    accumulated once per distinct input, as the official SparseGPT code rounds it (scale by
    sqrt(2 / n) first, then one product added to the rescaled sum). ALPS and L-ADMM
    normalise H by its diagonal, so its scale (sum or mean) does not change their result."""

    def new_stats(self, columns, device):
        return RunningMean(torch.zeros(columns, columns, dtype=torch.float32, device=device))

    def add_batch(self, stats: RunningMean, x: torch.Tensor) -> None:
        stats.add_term(x, scaled_gram)
