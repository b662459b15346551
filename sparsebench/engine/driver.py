"""The sequential block-by-block driver, written once for every method that works on one
decoder block at a time: the one-shot methods (pruners/layerwise.py), SAFE, block-wise
reconstruction (recover/reconstruct.py) and OWL's outlier probe (allocation.py).

1. Capture (`capture`): run the calibration windows into the model and record the hidden
   states entering block 0, plus every keyword argument the model passes to each block
   (position_embeddings, attention_mask, position_ids, ...). Gemma-3 passes different
   masks and rotary tables to sliding and global layers, so kwargs are kept per block.
2. Blocks in order (`Sequential`): for block i, move it to the compute device, hand the
   caller its inputs and arguments (`Step`), let the caller do its work (collect statistics
   and prune, or train), then run the block as the caller left it on its inputs: those
   outputs are block i+1's inputs. At most two blocks are on the device (the one in use, the
   next one arriving), so a model larger than the accelerator still prunes.
3. Statistics (`collect_statistics`): one pass of a block over its inputs with pre-hooks on
   its linears, accumulating a statistic per distinct input (linears that read the same
   tensor, q/k/v and gate/up, share one, so SparseGPT inverts each distinct Hessian once).
   The pass stops each forward once every linear has seen its input (the last linear's
   product and whatever follows it change no statistic).

The calibration inputs and outputs of a block (n x seqlen x hidden each) live on the
compute device, or, with `inputs="host"` (the memory plan's choice when they do not fit the
GPU: `calib_inputs=`), in pinned host memory: each batch of windows then reaches the GPU by
a copy issued on a side stream one batch ahead (`Windows`), so the transfer of batch j+1
overlaps the work on batch j. The windows and their order are the same, so the masks are too.

`batch=B` runs B windows per forward (the official one-shot code runs one: the default).
Statistics still accumulate window by window in the same order (each linear's input is
split per window before it is added), so only the block's own products see a larger batch.
On the CPU those products are bitwise the same (tests: B = 2, 3, 7 on tiny models); a GPU's
GEMM may pick another kernel for more rows and round differently, which is why B is part of
a run's identity and the default keeps the authors' rounding.

When the blocks live on the host and the device is a GPU, block i+1's weights are copied by
a worker thread on a side stream while block i is worked on (`Blocks`): two blocks are then
on the device at once, which the plan counts.
"""

from __future__ import annotations

import contextlib
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SparsebenchError
from ..models import find_blocks, find_linears


class Stop(Exception):
    """Raised inside the model forward once the needed inputs are recorded."""


def to_device(obj: Any, device: torch.device, float_dtype: torch.dtype | None = None) -> Any:
    """Tensors inside nested args/kwargs to `device`; floating ones also to `float_dtype` if
    given."""
    if isinstance(obj, torch.Tensor):
        dtype = float_dtype if float_dtype is not None and obj.is_floating_point() else obj.dtype
        return obj.to(device, dtype)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device, float_dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, float_dtype) for k, v in obj.items()}
    return obj


def _parent_and_attr(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def move_outside_blocks(model: nn.Module, device: torch.device) -> None:
    """Move embeddings, norms, rotary tables, lm_head to `device`; blocks stay where they are."""
    path, blocks = find_blocks(model)
    parent, attr = _parent_and_attr(model, path)
    setattr(parent, attr, nn.ModuleList())
    try:
        model.to(device)
    finally:
        setattr(parent, attr, blocks)


def block_out(out: Any) -> torch.Tensor:
    # transformers 5 blocks return a tensor; older ones return a tuple.
    return out[0] if isinstance(out, (tuple, list)) else out


class Windows:
    """A block's inputs, `batch` windows at a time, on the compute device. From host memory
    on a GPU, batch j+1's copy is issued on a side stream before batch j is handed out."""

    def __init__(self, x: torch.Tensor, device: torch.device, batch: int = 1):
        self.x, self.device, self.batch = x, device, batch
        self.stream = (
            torch.cuda.Stream(device) if device.type == "cuda" and x.device.type == "cpu" else None
        )

    def _fetch(self, j: int):
        with torch.cuda.stream(self.stream):
            return self.x[j : j + self.batch].to(self.device, non_blocking=True)

    def __iter__(self):
        n, b = self.x.shape[0], self.batch
        if self.stream is None:
            for j in range(0, n, b):
                yield self.x[j : j + b].to(self.device)
            return
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(
            current
        )  # the host buffer was written by the previous block's copies
        nxt = self._fetch(0)
        for j in range(0, n, b):
            current.wait_stream(self.stream)
            window = nxt
            window.record_stream(current)  # the side stream's memory is used on this one
            if j + b < n:
                nxt = self._fetch(j + b)
            yield window


def store_window(dest: torch.Tensor, j: int, value: torch.Tensor) -> None:
    """dest[j : j + len(value)] = value; into pinned host memory without waiting (finish_block
    synchronises)."""
    dest[j : j + value.shape[0]].copy_(
        value, non_blocking=dest.device.type == "cpu" and value.device.type == "cuda"
    )


def finish_block(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class Blocks:
    """The decoder blocks in order, each moved to the compute device while it is in use and
    back to where it lives afterwards. When they live on the host and the device is a GPU
    (or `prefetch=True`), a worker thread moves block i+1 on a side stream while the caller
    works on block i; the caller's stream waits for that copy before it touches the block."""

    def __init__(
        self,
        blocks: nn.ModuleList,
        device: torch.device,
        prefetch: bool | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.blocks, self.device, self.dtype = (
            blocks,
            device,
            dtype,
        )  # dtype: floating weights cast while in use
        home = next(blocks[0].parameters()).device
        self.prefetch = (
            (device.type == "cuda" and home.type == "cpu") if prefetch is None else prefetch
        )
        self.stream = torch.cuda.Stream(device) if self.prefetch and device.type == "cuda" else None

    def _load(self, i: int):
        block = self.blocks[i]
        with (
            torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        ):
            block.to(
                self.device, self.dtype, non_blocking=True
            )  # pageable weights: this thread waits, the caller does not
        if self.stream is None:
            return None
        done = torch.cuda.Event()
        done.record(self.stream)
        return done

    def _arrived(self, done, block: nn.Module) -> None:
        """The caller's stream waits for block's copy and owns its memory from here."""
        if done is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        for t in itertools.chain(block.parameters(), block.buffers()):
            t.record_stream(current)  # allocated on the side stream, used on this one

    def __iter__(self):
        n = len(self.blocks)
        # where each block lives, and its dtype when this loop casts it (SAFE, reconstruction)
        home = [
            (next(b.parameters()).device,) + ((next(b.parameters()).dtype,) if self.dtype else ())
            for b in self.blocks
        ]
        pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparsebench-block")
            if self.prefetch
            else None
        )
        try:
            nxt = pool.submit(self._load, 0) if pool else None
            for i, block in enumerate(self.blocks):
                if pool is None:
                    block.to(self.device, self.dtype)
                else:
                    self._arrived(nxt.result(), block)
                    if i + 1 < n:
                        nxt = pool.submit(self._load, i + 1)
                yield i, block
                finish_block(
                    self.device
                )  # the block's work is done before its memory is given back
                block.to(*home[i])
        finally:
            if pool is not None:
                pool.shutdown(wait=True)


def input_buffer(n: int, shape, dtype, device: torch.device, inputs: str) -> torch.Tensor:
    """n windows of a block's inputs on the compute device, or pinned on the host."""
    if inputs == "host" and device.type != "cpu":
        return torch.empty((n, *shape), dtype=dtype, pin_memory=torch.cuda.is_available())
    return torch.empty((n, *shape), dtype=dtype, device=device)


@torch.no_grad()
def capture(model: nn.Module, calib: torch.Tensor, device: torch.device, inputs: str = "device"):
    """Inputs of block 0 for every window, and (args, kwargs) each block receives.

    Window 0 runs the real blocks one at a time (so each records the kwargs the model
    gives it); every later window stops at block 0. `inputs="host"` keeps them in pinned
    host memory (see the module's docstring).
    """
    _, blocks = find_blocks(model)
    home = next(blocks.parameters()).device
    n = calib.shape[0]
    inps: torch.Tensor | None = None
    block_args: list[Any] = [None] * len(blocks)
    state = {"j": 0}

    def make_recorder(i: int, block: nn.Module, original):
        def forward(hidden, *args, **kwargs):
            nonlocal inps
            if i == 0:
                if inps is None:
                    inps = input_buffer(n, hidden.shape[1:], hidden.dtype, device, inputs)
                store_window(inps, state["j"], hidden)
            if state["j"] > 0:
                raise Stop
            block_args[i] = (args, kwargs)
            if i == len(blocks) - 1:
                raise Stop
            block.to(device)
            out = original(hidden, *args, **kwargs)
            block.to(home)
            return out

        return forward

    move_outside_blocks(model, device)
    for i, block in enumerate(blocks):
        block.forward = make_recorder(i, block, block.forward)
    try:
        for j in range(n):
            state["j"] = j
            try:
                model(calib[j : j + 1].to(device), use_cache=False)
            except Stop:
                pass
    finally:
        for block in blocks:
            del block.forward  # drop the instance attribute; the class method is back
        move_outside_blocks(model, home)
    finish_block(device)
    return inps, block_args


class SharedInputs:
    """Which linears read the very same input tensor (q/k/v, gate/up), learnt from the
    first forward call of the statistics pass itself, so finding them costs no extra run."""

    def __init__(self):
        self.leader: dict[str, str] = {}  # linear -> the first linear that read its input
        self._first: dict[
            str, torch.Tensor
        ] = {}  # leaders' first inputs, kept alive: equal data_ptr = same tensor

    def observe(self, name: str, x: torch.Tensor) -> str:
        """The leader of `name`: itself unless an earlier linear read this very tensor."""
        if name not in self.leader:
            for other, y in self._first.items():
                if x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride():
                    self.leader[name] = other
                    break
            else:
                self.leader[name] = name
                self._first[name] = x
        return self.leader[name]

    def release(self) -> None:
        self._first.clear()


@dataclass
class Step:
    """Block `index` on the compute device, with what it receives: `inputs` (n windows x
    seqlen x hidden, on the device or pinned on the host), the positional `args` and keyword
    `kwargs` the model gives it. `outputs` is a buffer of the same shape the caller may use
    as scratch (SAFE keeps the dense block's outputs there); after the caller's work the
    driver overwrites it with this block's outputs, the next block's inputs."""

    index: int
    block: nn.Module
    inputs: torch.Tensor
    outputs: torch.Tensor
    args: tuple
    kwargs: dict


class Sequential:
    """The decoder blocks of `model`, one `Step` at a time, from the calibration windows `calib`.

    `dtype`: blocks, inputs and floating arguments in this dtype while in use (SAFE and
    reconstruction train in float32), the blocks back in their own afterwards. `batch`:
    windows per forward when the driver runs a block for the next one's inputs."""

    def __init__(
        self,
        model: nn.Module,
        calib: torch.Tensor,
        device: torch.device,
        inputs: str = "device",
        batch: int = 1,
        dtype: torch.dtype | None = None,
        desc: str = "blocks",
    ):
        self.model, self.calib, self.device, self.inputs = model, calib, device, inputs
        self.batch, self.dtype, self.desc = batch, dtype, desc
        self.path, self.blocks = find_blocks(model)

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[Step]:
        inps, block_args = capture(self.model, self.calib, self.device, self.inputs)
        if self.dtype is not None:
            inps = inps.to(self.dtype)
        outs = input_buffer(inps.shape[0], inps.shape[1:], inps.dtype, self.device, self.inputs)
        blocks = Blocks(self.blocks, self.device, dtype=self.dtype)
        for i, block in tqdm(blocks, total=len(self.blocks), desc=self.desc, unit="block"):
            args, kwargs = to_device(block_args[i], self.device, self.dtype)
            yield Step(i, block, inps, outs, args, kwargs)
            with torch.no_grad():  # the block as the caller left it feeds the next one
                for j, window in zip(
                    range(0, inps.shape[0], self.batch), Windows(inps, self.device, self.batch)
                ):
                    store_window(outs, j, block_out(block(window, *args, **kwargs)))
            inps, outs = (
                outs,
                inps,
            )  # Blocks synchronises (finish_block) before the next block starts


@torch.no_grad()
def collect_statistics(
    block: nn.Module,
    inps: torch.Tensor,
    args,
    kwargs,
    new_stats: Callable[[int, torch.device], Any],
    add_batch: Callable[[Any, torch.Tensor], None],
    batch: int = 1,
    who: str = "method",
):
    """One statistics pass of `block` over `inps` (`batch` windows per forward).

    Returns (linears, groups, stats, tokens, unused): the block's linears by name, {leader: the
    linears that read its input, in block order}, {leader: its statistic}, built by
    `new_stats(columns, device)` and `add_batch(stat, x)` with x one window's input (1, tokens,
    columns) at a time (a mixture of experts' expert: the tokens routed to it, (tokens,
    columns)), {linear: input rows it saw} and the linears that never ran (an expert no
    calibration token was routed to): the caller decides what they get."""
    linears = find_linears(block)
    sharing = SharedInputs()
    stats: dict[str, Any] = {}  # one statistic per distinct input
    calls: list[str] = []  # the linears the current forward has run, in order
    skip_tail = False  # stop each forward once every linear's input is recorded (see below)
    windows = 0  # in the current forward
    tokens: dict[str, int] = {}
    device = next(block.parameters()).device

    def record(name):
        def hook(
            module, args
        ):  # a pre-hook (the input is all we need); returning None keeps the input
            x = args[0].detach()
            tokens[name] = tokens.get(name, 0) + x.numel() // x.shape[-1]
            if sharing.observe(name, x) == name:
                if name not in stats:
                    stats[name] = new_stats(linears[name].in_features, device)
                if windows == 1:
                    add_batch(stats[name], x)
                elif (
                    x.dim() == 3 and x.shape[0] == windows
                ):  # window by window, as one per forward adds them
                    for k in range(windows):
                        add_batch(stats[name], x[k : k + 1])
                else:
                    raise SparsebenchError(
                        f"calib_batch={batch}: linear '{name}' of {who}'s block reads an input of "
                        "shape "
                        f"{tuple(x.shape)}, not one row per window (a mixture of experts routes "
                        "tokens), so its "
                        f"statistics cannot be added window by window; use calib_batch=1"
                    )
            calls.append(name)
            if skip_tail and len(set(calls)) == len(linears):
                raise Stop  # the last linear's own product and the rest of the block are not needed

        return hook

    hooks = [lin.register_forward_pre_hook(record(name)) for name, lin in linears.items()]
    try:
        for j, window in enumerate(Windows(inps, device, batch)):
            calls.clear()
            windows = window.shape[0]
            try:
                block(window, *args, **kwargs)
            except Stop:
                pass
            if j == 0:
                # The first forward runs the whole block. If it ran every linear exactly once (not
                # a mixture of experts, whose linears run as the data routes them), every later
                # forward stops as soon as all of them have their input: in a Llama block that
                # skips down_proj's product, a fifth of this pass's multiply-adds.
                skip_tail = sorted(calls) == sorted(linears)
    finally:
        for h in hooks:
            h.remove()
        sharing.release()
    unused = [name for name in linears if name not in sharing.leader]
    groups: dict[str, list[str]] = {}  # leader -> the linears reading its input, in block order
    for name in linears:
        if name in sharing.leader:
            groups.setdefault(sharing.leader[name], []).append(name)
    return linears, groups, stats, tokens, unused
