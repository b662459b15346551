"""Adam with 8-bit states, in plain torch (runs on CPU and GPU; Elsa-L's optional optimizer).

Each row of a state tensor is split into equal blocks of at most `block` values (a row of
4096 into two of 2048, of 576 into one): a block never straddles two rows, so a rank that
holds some rows under FSDP2 quantizes them exactly as one process holding the whole tensor
does. One-dimensional parameters (norms, biases; a tiny share of a model) keep float32
moments, as bitsandbytes keeps small tensors in 32 bits.
  exp_avg      int8, linear, one absmax scale per block (signed)
  exp_avg_sq   uint8 in the log domain, one (min, max) of log(v) per block; 0 codes v = 0.
               A log code keeps small second moments small but non-zero relative to
               their block, so 1/sqrt(v) never explodes the way a linear code with
               absmax scaling would (small v rounding to 0).
States are dequantized for each step and requantized after it, so one float32 copy
of a single tensor's state exists at a time.
"""

from __future__ import annotations

import math

import torch

from .shard import local

BLOCK = 2048


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """x as (blocks, width): each row of x (a 2-D view: first dim x the rest) cut into
    ceil(cols / block) equal blocks, the row's last one zero-padded."""
    rows = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
    cols = rows.shape[1]
    width = -(-cols // -(-cols // block))  # ceil(cols / ceil(cols / block))
    nb = -(-cols // width)
    pad = nb * width - cols
    if pad:
        rows = torch.cat([rows, rows.new_zeros(rows.shape[0], pad)], 1)
    return rows.reshape(-1, width), pad


def state_bytes(shape: tuple[int, ...], block: int = BLOCK) -> int:
    """Bytes of Adam8bit's state for a parameter of this shape (what the memory plan counts):
    two 1-byte codes per value (padded to whole blocks) and 12 bytes of scales per block;
    a one-dimensional parameter keeps two float32 moments."""
    if len(shape) < 2:
        return 8 * math.prod(shape)
    rows, cols = shape[0], math.prod(shape[1:])
    width = -(-cols // -(-cols // block))
    nb = -(-cols // width)
    return rows * nb * (2 * width + 12)


def _pad_of(q: torch.Tensor, like: torch.Tensor) -> int:
    """The per-row padding of `like`'s blocks (q: its codes, (blocks, width))."""
    rows = like.shape[0] if like.dim() > 1 else 1
    return q.numel() // rows - like.numel() // rows


def _unblock(b: torch.Tensor, pad: int, like: torch.Tensor) -> torch.Tensor:
    rows = b.reshape(like.shape[0] if like.dim() > 1 else 1, -1)
    return (rows[:, : rows.shape[1] - pad] if pad else rows).reshape(like.shape)


def quantize_signed(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    b, _ = _blocks(x.float(), block)
    scale = b.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127.0
    return torch.round(b / scale).to(torch.int8), scale.squeeze(1)


def dequantize_signed(q: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return _unblock(q.float() * scale.unsqueeze(1), _pad_of(q, like), like)


def quantize_log(v: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """v >= 0 -> uint8 codes (0: v == 0; 1..255: log(v) spread over the block's range)."""
    b, _ = _blocks(v.float(), block)
    pos = b > 0
    # log of a subnormal float32 is exact enough; clamping them would inflate tiny v.
    logs = torch.where(pos, b.log(), torch.full_like(b, math.inf))
    lo = logs.amin(1, keepdim=True)
    hi = torch.where(pos, logs, torch.full_like(b, -math.inf)).amax(1, keepdim=True)
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi = torch.where(torch.isfinite(hi), hi, lo)
    span = (hi - lo).clamp_min(1e-12)
    code = 1 + torch.round((logs.clamp(max=1e30) - lo) / span * 254)
    code = torch.where(pos, code, torch.zeros_like(code)).clamp(0, 255)
    return code.to(torch.uint8), torch.cat([lo, hi], 1)


def dequantize_log(q: torch.Tensor, lohi: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    lo, hi = lohi[:, :1], lohi[:, 1:]
    v = torch.exp(lo + (q.float() - 1) / 254 * (hi - lo))
    v = torch.where(q == 0, torch.zeros_like(v), v)
    return _unblock(v, _pad_of(q, like), like)


class Adam8bit(torch.optim.Optimizer):
    """Adam (no weight decay) whose moments are stored in 8 bits per value."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, block: int = BLOCK):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, block=block))

    def moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(exp_avg, exp_avg_sq) dequantized to float32, or None before the first step."""
        st = self.state.get(p)
        if not st:
            return None
        if "exp_avg" in st:  # a one-dimensional parameter's float32 moments
            return st["exp_avg"], st["exp_avg_sq"]
        w = local(p)  # under FSDP2 the moments are this rank's rows
        return (
            dequantize_signed(st["m_q"], st["m_scale"], w),
            dequantize_log(st["v_q"], st["v_range"], w),
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                w = local(
                    p
                )  # a sharded (FSDP2) parameter updates its own rows: the state is sharded too
                if not st:
                    st["step"] = 0
                    m, v = (
                        torch.zeros_like(w, dtype=torch.float32),
                        torch.zeros_like(w, dtype=torch.float32),
                    )
                    if w.dim() < 2:  # norms, biases: float32 moments, updated in place
                        st["exp_avg"], st["exp_avg_sq"] = m, v
                else:
                    m, v = self.moments(p)
                st["step"] += 1
                g = local(p.grad).float()
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                bc1, bc2 = 1 - b1 ** st["step"], 1 - b2 ** st["step"]
                denom = (v / bc2).sqrt_().add_(group["eps"])
                w.add_((m / bc1 / denom).to(w.dtype), alpha=-group["lr"])
                if w.dim() >= 2:
                    st["m_q"], st["m_scale"] = quantize_signed(m, group["block"])
                    st["v_q"], st["v_range"] = quantize_log(v, group["block"])
        return loss
