"""SparseLLM (Bai et al., NeurIPS 2024, "SparseLLM: Towards Global Pruning of Pre-trained
Language Models"): each block's MLP is pruned as a whole, its linears coupled through auxiliary
variables for the intermediate activations, instead of each linear alone.

Taken from the released code (BaiTheBest/SparseLLM, model_utils.py `opt_sparsellm` and
`llama_sparsellm`, pruning with its SparseGPT): one dense forward of the block records every
linear's Hessian and the MLP's activations on the calibration windows: X (the MLP's input), z
(the up / fc1 output), s (the gate output, gated MLPs), p (the down / fc2 input), Y (the block's
MLP output, the target). The attention linears are pruned by SparseGPT. The MLP then alternates
`epochs` times (4; the released LLaMA script runs one where the block index is 1, 30 or 31):
1. W (not in the first epoch): up / fc1 = (z - b) X^+, gate = s X^+ (X^+ the pseudo-inverse of
   X, computed once); down = Y p^+ (gated), fc2 by 10 gradient steps (lr 0.01) on the mean
   squared error to Y (OPT, as released); down / fc2's Hessian recomputed from p;
2. prune up, gate, down / fc1, fc2 with SparseGPT at the target (every SparseGPT call on a
   Hessian adds its damping to it in place, as the released class does, so the up / gate
   Hessian's damping compounds over the epochs);
3. p = (beta W2^T W2 + gamma I)^-1 (beta W2^T (Y - b2) + gamma act(z or s) z);
4. z: gated, (W_up X + act(s) p) / (act(s)^2 + 1); ReLU (OPT), the better of the two
   branches of the proximal step (z >= 0 from (gamma p + alpha W1 X) / (gamma + alpha), z <= 0
   from W1 X), by gamma (p - relu(z))^2 + alpha (z - W1 X)^2;
5. s (gated): 2 gradient steps (lr 0.01, 1000 tokens a chunk) on alpha ||s - W_gate X||^2 +
   gamma ||p - act(s) z||^2.
alpha = beta = gamma = 5 for gated MLPs (the LLaMA script), 0.1 for OPT. The released code runs
float16 models and casts X^+, the inverse in step 3, p^+, fc2's update and s to float16;
here they are in the model's dtype (the same casts on a float16 model, float32 on a float32 one).
Families: gated MLPs named up/gate/down (Llama, Mistral, Qwen, Gemma, Phi-3's split gate_up)
with their own activation, and OPT's ReLU fc1/fc2; any other MLP (GELU fc1/fc2, mixtures of
experts) is refused before any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.driver import Windows, collect_statistics
from ..engine.gram import RunningMean
from ..errors import SparsebenchError
from ..masks import apply_mask
from ..models import find_blocks, find_linears
from ..registry import METHODS, option
from .sparsegpt import SparseGPT

GATED = {  # role -> the linear's name inside a block (Phi-3's split gate_up_proj second)
    "up": ("mlp.up_proj", "mlp.gate_up_proj.up"),
    "gate": ("mlp.gate_proj", "mlp.gate_up_proj.gate"),
    "down": ("mlp.down_proj",),
}
RELU = {"up": ("fc1",), "down": ("fc2",)}


def mlp_roles(block: nn.Module, config) -> tuple[str, dict[str, str], nn.Module | None]:
    """("gated" | "relu" | why not, {role: linear name}, the activation) of a block's MLP."""
    names = set(find_linears(block))
    if any(".experts." in n for n in names):
        return "a mixture of experts (no dense MLP to couple)", {}, None
    for kind, table in (("gated", GATED), ("relu", RELU)):
        roles = {r: next((n for n in opts if n in names), None) for r, opts in table.items()}
        if all(roles.values()):
            if kind == "gated":
                act = getattr(block.mlp, "act_fn", None) or getattr(
                    block.mlp, "activation_fn", None
                )
                if act is None:
                    return "a gated MLP without act_fn", {}, None
                return kind, roles, act
            if getattr(config, "activation_function", None) != "relu":
                return (f"an fc1/fc2 MLP with {getattr(config, 'activation_function', '?')} "
                        "(the released proximal z-step is ReLU's)"), {}, None  # fmt: skip
            return kind, roles, nn.ReLU()
    return "no up/gate/down or fc1/fc2 MLP", {}, None


def released_defaults(kind: str) -> float:
    return 5.0 if kind == "gated" else 0.1


@METHODS.register("sparsellm")
@dataclass
class SparseLLM(SparseGPT):
    epochs: int = option(4, ge=1)
    # the released LLaMA script runs one epoch in blocks 1, 30 and 31 (of Llama-2-7B's 32)
    single_epoch_blocks: tuple[int, ...] = field(default=(1, 30, 31))
    alpha: float | None = option(None, gt=0)  # None: 5 for gated MLPs, 0.1 for OPT (released)
    beta: float | None = option(None, gt=0)
    gamma: float | None = option(None, gt=0)
    w_steps: int = option(10, ge=0)  # OPT fc2: gradient steps per epoch
    w_lr: float = option(0.01, gt=0)
    s_steps: int = option(2, ge=0)  # gated: gradient steps on s per epoch
    s_lr: float = option(0.01, gt=0)
    s_chunk: int = option(1000, ge=1)

    def check_model(self, model: nn.Module) -> None:
        """Refused before any work: a block whose MLP the released updates do not cover."""
        _, blocks = find_blocks(model)
        kind, _, _ = mlp_roles(blocks[0], model.config)
        if kind not in ("gated", "relu"):
            raise SparsebenchError(
                f"sparsellm couples a dense MLP's linears (gated up/gate/down, or OPT's ReLU "
                f"fc1/fc2); {type(model).__name__}'s block has {kind}: use method=sparsegpt"
            )

    def plan_terms(self, device):
        from ..plan import Terms

        # SparseGPT's Hessians; the MLP's activations X, Y, z, s, p and the step temporaries
        return Terms("oneshot", stats="hessian", activation_copies=10)

    def refinable(self):  # its MLP masks come from the alternation: no mask refinement
        return None

    @torch.no_grad()
    def prune_block(self, block, inps, args, kwargs, sparsity, pattern, batch=1, scratch=None):
        kind, roles, act = mlp_roles(block, self._config)
        if kind not in ("gated", "relu"):
            raise SparsebenchError(f"sparsellm: this block has {kind}")
        acts = capture(block, inps, args, kwargs, roles)
        linears, groups, stats, tokens, _ = collect_statistics(
            block, inps, args, kwargs, self.new_stats, self.add_batch, batch, who=self.name
        )
        self.block_orders, self.last_tokens, self.last_fallback = {}, tokens, []
        by_linear = {n: leader for leader, names in groups.items() for n in names}
        mlp = set(roles.values())
        masks = {}
        for leader, names in groups.items():  # attention (and anything else): SparseGPT
            rest = [n for n in names if n not in mlp]
            if rest:
                prepared = self.prepare(stats[leader])
                for name, keep in zip(rest, self.prune_group(
                        [linears[n] for n in rest], prepared, sparsity, pattern)):  # fmt: skip
                    masks[name] = keep
        index = len(self.epochs_run)  # this block's (the released single-epoch blocks)
        epochs = 1 if kind == "gated" and index in self.single_epoch_blocks else self.epochs
        h = {r: stats[by_linear[n]] for r, n in roles.items()}
        mlp_masks = self.alternate(kind, {r: linears[n] for r, n in roles.items()}, h, acts,
                                   act, epochs, sparsity, pattern)  # fmt: skip
        masks.update({roles[r]: keep for r, keep in mlp_masks.items()})
        for name, keep in masks.items():
            apply_mask(linears[name], keep)
        self.epochs_run.append(epochs)
        return masks

    def _prune(self, linear, stat: RunningMean, sparsity, pattern) -> torch.Tensor:
        """SparseGPT on `stat`'s Hessian (the caller adds its damping to it afterwards)."""
        return self.prune_group([linear], self.prepare(stat), sparsity, pattern)[0]

    def alternate(self, kind, lin, h, a, act, epochs, sparsity, pattern):
        alpha = self.alpha or released_defaults(kind)
        beta = self.beta or released_defaults(kind)
        gamma = self.gamma or released_defaults(kind)
        dt = lin["up"].weight.dtype
        X, Y, z, p = a["X"], a["Y"], a["z"], a["p"]
        s = a.get("s")
        x_inv = torch.pinverse(X.float()).to(dt)
        order = ["up", "gate", "down"] if kind == "gated" else ["up", "down"]
        b1 = lin["up"].bias
        b2 = lin["down"].bias
        keeps, losses = {}, []
        for step in range(epochs):
            if step > 0:  # W from the auxiliary variables
                if not all(
                    bool(torch.isfinite(t).all())
                    for t in (p, z) + ((s,) if kind == "gated" else ())
                ):
                    raise self._diverged(step, "the auxiliary variables are not finite")
                w1 = torch.matmul(z - _col(b1, z), x_inv) if b1 is not None else z @ x_inv
                lin["up"].weight.copy_(w1)
                if kind == "gated":
                    lin["down"].weight.copy_(torch.matmul(Y, torch.pinverse(p.float()).to(dt)))
                    lin["gate"].weight.copy_(torch.matmul(s, x_inv))
                else:
                    lin["down"].weight.copy_(self._fc2_steps(lin["down"], p, Y).to(dt))
                h["down"] = _hessian(p, a["windows"])
            for role in order:  # the shared up/gate Hessian is damped once per epoch
                try:
                    keeps[role] = self._prune(lin[role], h[role], sparsity, pattern)
                except SparsebenchError as err:  # a diverged alternation, said as such
                    big = float(lin[role].weight.float().abs().max())
                    raise self._diverged(
                        step,
                        f"|p| up to {float(p.float().abs().max()):.3g}, "
                        f"|W| of {role} up to {big:.3g}; {err}",
                    ) from None
            for role in dict.fromkeys(order):
                if role != "gate" or kind != "gated" or h["gate"] is not h["up"]:
                    _damp(h[role], self.percdamp)
            w2 = lin["down"].weight
            # the identity in float32 as released (an fp16 model's sum is then float32)
            eye = torch.eye(w2.shape[1], device=w2.device)
            av = torch.inverse(beta * torch.matmul(w2.T, w2) + gamma * eye).to(dt)
            nl = act(s) * z if kind == "gated" else F.relu(z)
            target = Y - _col(b2, Y) if b2 is not None else Y
            p = torch.matmul(av, beta * torch.matmul(w2.T, target) + gamma * nl)
            m = torch.matmul(lin["up"].weight, X)
            if b1 is not None:
                m = m + _col(b1, m)
            if kind == "gated":
                sw = act(s)
                z = (m + sw * p) / (sw**2 + 1)
                s = self._s_steps(lin["gate"].weight, X, z, p, s, act, alpha, gamma)
            else:
                z = _relu_z(z, p, m, alpha, gamma)
            losses.append(_mlp_error(kind, lin, act, X, Y))  # the released train_loss
        self.mlp_errors.append(losses)
        if not all(map(math.isfinite, losses)):
            raise self._diverged(epochs - 1, "the MLP's squared error to its dense output by "
                                 f"epoch: {', '.join(map(_g, losses))}")  # fmt: skip
        return keeps

    def _diverged(self, step: int, detail: str) -> SparsebenchError:
        """The one line a non-finite alternation stops with (float16 overflows first)."""
        return SparsebenchError(
            f"sparsellm: block {len(self.epochs_run)}, epoch {step + 1}: the alternation "
            f"diverged ({detail}); its step sizes do not suit this model: lower method.w_lr or "
            "method.s_lr, or use method.epochs=1 (SparseGPT)"
        )

    def _fc2_steps(self, fc2, p, Y):
        w = fc2.weight.detach().float().clone().requires_grad_(True)
        bias = _col(fc2.bias, Y).float() if fc2.bias is not None else 0
        for _ in range(self.w_steps):
            with torch.enable_grad():
                loss = (torch.matmul(w, p.float()) + bias - Y.float()).pow(2).mean()
                (grad,) = torch.autograd.grad(loss, w)
            w = (w - self.w_lr * grad).detach().requires_grad_(True)
        return w.detach()

    def _s_steps(self, w_gate, X, z, p, s, act, alpha, gamma):
        """Gradient steps on s, chunk by chunk. Every operand is a float32 leaf that requires a
        gradient and the loss is built and back-propagated as released: the accumulation order
        of s's gradient from its two terms follows the graph, so this keeps it bit for bit."""
        w = w_gate.detach().float().requires_grad_(True)
        s = s.clone()
        for _ in range(self.s_steps):
            for k in range(0, s.shape[-1], self.s_chunk):
                c = slice(k, k + self.s_chunk)
                xb, zb, pb, sb = (t[:, c].float().requires_grad_(True) for t in (X, z, p, s))
                with torch.enable_grad():
                    loss = alpha * torch.norm(sb - torch.matmul(w, xb)) ** 2
                    loss += gamma * torch.norm(pb - act(sb) * zb) ** 2
                loss.backward()
                s[:, c] = (sb.detach() - self.s_lr * sb.grad).to(s.dtype)
        return s

    def prune(self, ctx):
        self._config = ctx.model.config
        self.epochs_run: list[int] = []  # per block, in order: its index is the list's length
        self.mlp_errors: list[list[float]] = []
        return super().prune(ctx)

    def report(self):
        out = super().report()
        errors = getattr(self, "mlp_errors", [])
        why = raised_error(errors)
        if why:
            out["warnings"] = [*out.get("warnings", []), why]
        return {
            **out,
            "sparsellm": {
                "epochs_per_block": getattr(self, "epochs_run", []),
                "mlp_error_by_epoch": errors,  # the released train_loss
            },
        }


def raised_error(errors: list[list[float]]) -> str | None:
    """A warning where the alternation ended with a larger MLP error than its first epoch's
    (SparseGPT's masks on the weights as they came): there it made the MLP worse than no
    alternation, and its released step sizes do not converge on this model."""
    worse = [(i, e) for i, e in enumerate(errors) if len(e) > 1 and e[-1] > e[0]]
    if not worse:
        return None
    i, e = max(worse, key=lambda ie: ie[1][-1] / ie[1][0])
    alternating = sum(len(e) > 1 for e in errors)
    return (
        f"sparsellm: the alternation raised the MLP's error to its dense output in {len(worse)} "
        f"of {alternating} blocks (worst: block {i}, {_g(e[0])} after the first epoch, "
        f"{_g(e[-1])} after the last): its step sizes do not converge on this model; compare "
        "method.epochs=1 (SparseGPT inside) or a lower method.s_lr"
    )


def _col(bias: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return bias.unsqueeze(1).expand(-1, like.size(-1))


def _damp(stat: RunningMean, percdamp: float) -> None:
    """What the released fasterprune leaves in its Hessian: dead inputs at 1, the damping
    percdamp x mean(diag H) added to the diagonal, in place."""
    H = stat.value
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))


def _hessian(p: torch.Tensor, windows: int) -> RunningMean:
    """down / fc2's Hessian from p, window by window, with the released loop's operations and
    layouts (the same running mean as SparseGPT's statistic; a transposed operand would round
    the products differently)."""
    cols = p.shape[0]
    stat = RunningMean(torch.zeros(cols, cols, dtype=torch.float32, device=p.device))
    for x in p.T.reshape(windows, -1, cols):  # (tokens, cols) of one window
        inp = x.t()
        stat.value *= stat.nsamples / (stat.nsamples + 1)
        stat.nsamples += 1
        inp = math.sqrt(2 / stat.nsamples) * inp.float()
        stat.value += inp.matmul(inp.t())
    return stat


def _g(v: float) -> str:
    return f"{v:.3g}"


def _mlp_error(kind, lin, act, X, Y) -> float:
    """The pruned MLP's mean squared error to the dense MLP's output (float32)."""
    x = X.float()
    if kind == "gated":
        h = act(lin["gate"].weight.float() @ x) * (lin["up"].weight.float() @ x)
    else:
        h = lin["up"].weight.float() @ x
        if lin["up"].bias is not None:
            h = h + lin["up"].bias.float()[:, None]
        h = F.relu(h)
    out = lin["down"].weight.float() @ h
    if lin["down"].bias is not None:
        out = out + lin["down"].bias.float()[:, None]
    return float(F.mse_loss(out, Y.float()))


def _relu_z(z, p, m, alpha, gamma):
    """The released proximal step for z under ReLU: the better of the z >= 0 and z <= 0
    branches, elementwise."""
    sol1 = (gamma * p + alpha * m) / (gamma + alpha)
    z1 = torch.where(sol1 >= 0, sol1, torch.zeros_like(sol1))
    z2 = torch.where(m <= 0, m, torch.zeros_like(m))
    f1 = gamma * torch.square(p - F.relu(z1)) + alpha * torch.square(z1 - m)
    f2 = gamma * torch.square(p - F.relu(z2)) + alpha * torch.square(z2 - m)
    out = z.clone()
    out[f1 <= f2] = z1[f1 <= f2]
    out[f2 < f1] = z2[f2 < f1]
    return out


@torch.no_grad()
def capture(block, inps, args, kwargs, roles) -> dict[str, torch.Tensor]:
    """The MLP's activations on every window of the dense block, as (features, tokens): X (the
    up / fc1 input), z (its output), s (the gate's output), p (down / fc2's input), Y (its
    output); `windows` the count."""
    got: dict[str, list[torch.Tensor]] = {k: [] for k in ("X", "z", "s", "p", "Y")}
    linears = find_linears(block)

    def hook(role):
        def fn(module, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
            y = out.detach().reshape(-1, out.shape[-1])
            if role == "up":
                got["X"].append(x)
                got["z"].append(y)
            elif role == "gate":
                got["s"].append(y)
            else:
                got["p"].append(x)
                got["Y"].append(y)

        return fn

    hooks = [linears[n].register_forward_hook(hook(r)) for r, n in roles.items()]
    try:
        for window in Windows(inps, next(block.parameters()).device, 1):
            block(window, *args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    # (tokens, features) stacked, seen as (features, tokens): the released layout, kept (the
    # norms and products of its updates reduce in this order; a copy would round differently)
    out = {k: torch.cat(v).T for k, v in got.items() if v}
    out["windows"] = inps.shape[0]
    return out
