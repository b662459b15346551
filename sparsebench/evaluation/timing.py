"""The clocks of the speed measurement (speed.py): the memory bandwidth, a prefill forward and
a decoded token, each a function that returns one sample, and `interleaved`, which takes the
samples of two or more sides of a comparison in turn.

Why in turn: on a shared or throttling machine the speed drifts by several percent within a
minute, so a dense run measured wholly before the sparse one moves their ratio by as much as a
kernel change does (env C: the same 0.5 model measured 1.32x and 1.15x dense in two consecutive
dense-then-sparse pairs of a one-off script, docs/notes/2026-12-07-panels-prefetch.md).
Taking one sample of each side in turn puts the drift into both.
"""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from ..engine.training import sync_cuda


def clock() -> float:
    sync_cuda()  # queued CUDA work first
    return time.perf_counter()


def median_s(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    return median_beside(fn, None, repeats, warmup)[0]


def interleaved(
    use: Callable[[str], None],
    sample: Callable[[], float],
    sides: tuple[str, ...],
    repeats: int,
    warmup: int,
) -> dict[str, float]:
    """The median of `repeats` samples of each side, taken in turn (`use(side)` switches the
    model to it; `sample()` returns one measurement), after `warmup` samples of each."""
    for side in sides:
        use(side)
        for _ in range(warmup):
            sample()
    samples: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(repeats):
        for side in sides:
            use(side)
            samples[side].append(sample())
    return {side: statistics.median(v) for side, v in samples.items()}


def copy_sampler(device: torch.device) -> Callable[[], float]:
    """One sample of the device's memory bandwidth now, in GB/s: a copy (256 MiB on the CPU, 2
    GiB on a GPU, well beyond its caches), bytes read + written / time."""
    mib = 2048 if device.type == "cuda" else 256
    a = torch.ones(mib * 2**20 // 4, device=device)
    b = torch.empty_like(a)

    def sample() -> float:
        start = clock()
        b.copy_(a)
        return 2 * mib * 2**20 / (clock() - start) / 1e9

    return sample


def bandwidth_gbs(device: torch.device, repeats: int = 5) -> float:
    """The median of `repeats` copy samples taken now (after one unrecorded)."""
    sample = copy_sampler(device)
    sample()
    return statistics.median(sample() for _ in range(repeats))


def median_beside(
    fn: Callable[[], Any], probe: Callable[[], float] | None, repeats: int, warmup: int
) -> tuple[float, list[float]]:
    """The median seconds of `fn` over `repeats` runs after `warmup`, and a sample of `probe`
    (if any) after each run: a bandwidth measured in the same seconds as the timing it is a
    floor for. (On a shared host the copy bandwidth moves by half within a minute: env B gave 24
    to 55 GB/s in one run of bench_speed.py, where a floor from one moment put the same kernel
    at 0.9 and at 2.2 of it.)"""
    for _ in range(warmup):
        fn()
    times, probes = [], []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
        if probe is not None:
            probes.append(probe())
    return statistics.median(times), probes


def random_tokens(vocab: int, shape: tuple[int, int], device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, shape, generator=g).to(device)


def prefill_sampler(model: nn.Module, batch: int, seqlen: int) -> Callable[[], float]:
    """One sample: seconds of one forward of `batch` windows of `seqlen` tokens."""
    device = model.get_input_embeddings().weight.device
    x = random_tokens(model.config.vocab_size, (batch, seqlen), device, 0)

    @torch.no_grad()
    def sample() -> float:
        start = clock()
        model(input_ids=x, use_cache=False)
        return clock() - start

    return sample


def decode_sampler(model: nn.Module, batch: int, steps: int) -> Callable[[], float]:
    """One sample: seconds per generated token (greedy, with the KV cache), `steps` tokens
    after a 16-token prompt, `batch` sequences."""
    from transformers import DynamicCache

    device = model.get_input_embeddings().weight.device
    prompt = random_tokens(model.config.vocab_size, (batch, 16), device, 0)
    # transformers 5.24 names the KV cache `cache` (`past_key_values` is deprecated)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.no_grad()
    def sample() -> float:
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prompt, use_cache=True, **{key: cache})
        token = out.logits[:, -1:].argmax(-1)
        start = clock()
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, **{key: cache})
            token = out.logits[:, -1:].argmax(-1)
        return (clock() - start) / steps

    return sample
