"""8-bit Adam: sparsebench's (engine/adam8bit.py) against torchao's AdamW8bit and float32 Adam
(docs/results.md (history: docs/notes/), "8-bit Adam"). Needs torchao: pip install --no-deps
torchao==0.18.0

    python scripts/bench_adam8bit.py
"""

import time
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
from torchao.optim import AdamW8bit  # noqa: E402 (after the thread count)

from sparsebench.engine.adam8bit import Adam8bit  # noqa: E402

torch.manual_seed(0)
shape = (2048, 1024)
target = torch.randn(shape)


def run(make, steps=30):
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = make([p])
    times = []
    for i in range(steps):
        p.grad = (p.detach() - target) + 0.1 * torch.randn(shape)
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return p.detach().clone(), times, opt


ref, tr, _ = run(lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.9, 0.95), eps=1e-8))
for name, make in [
    ("sparsebench Adam8bit", lambda ps: Adam8bit(ps, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)),
    (
        "torchao AdamW8bit",
        lambda ps: AdamW8bit(ps, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0),
    ),
]:
    w, t, opt = run(make)
    st = opt.state[next(iter(opt.state))]
    nbytes = 0
    for v in st.values():
        if hasattr(v, "codes"):
            nbytes += (
                v.codes.numel() * v.codes.element_size()
                + v.scale.numel() * v.scale.element_size()
                + (v.qmap.numel() * 4 if hasattr(v, "qmap") else 0)
            )
        elif isinstance(v, torch.Tensor):
            nbytes += v.numel() * v.element_size()
    rel = float((w - ref).norm() / ref.norm())
    print(
        f"{name}: first step {t[0]:.3f} s, later steps mean {sum(t[5:]) / len(t[5:]) * 1000:.1f} "
        f"ms (fp32 Adam {sum(tr[5:]) / len(tr[5:]) * 1000:.1f} ms); state "
        f"{nbytes / (shape[0] * shape[1]):.3f} B/param; rel. distance to fp32 Adam after 30 steps "
        f"{rel:.2e}",
        flush=True,
    )
