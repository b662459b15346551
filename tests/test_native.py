"""The compiled kernels (sparsebench/native: bitmask's expand, gather's index-gather): every path
this CPU has, forced one at a time, computes y = x W^T within the float32 dot-product bound on
random and adversarial masks, really runs (its own call counters), gives the same bits whatever
the thread count; the bitmask export is the expand kernel's input; and a kernel is refused with
one line where it cannot be built or forced."""

import os

import pytest
import torch

from sparsebench import native
from sparsebench.errors import SparsebenchError
from sparsebench.evaluation.kernels import Bitmask, Gather, sparse_form, unavailable
from sparsebench.formats import pack

from .numerics import gamma

if native.why_unavailable():  # CI and make install build it; only a machine without g++ skips
    pytest.skip(f"bitmask kernel unavailable: {native.why_unavailable()}", allow_module_level=True)

PATHS = native.supported()
KERNELS = ("bitmask", "gather")


def _weight(rows, cols, sparsity, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    return w.to(dtype)


def _adversarial(rows, cols):
    """Rows with nothing kept, everything kept, one weight kept at each end, alternating."""
    w = _weight(rows, cols, 0.5, 1)
    w[0] = 0
    w[1] = torch.randn(cols)
    w[2] = 0
    w[2, 0] = 1.5
    w[3] = 0
    w[3, -1] = -2.0
    w[4, ::2] = 0
    return w


def _check(w, x, path, kernel):
    """|y - x W^T| <= gamma(in) sum |x| |w| against the exact (float64) product of the stored
    values: each output sums at most `in` products, whatever the lanes' order."""
    index, values, rowptr = native.layout_of_weight(w, w.dtype, kernel)
    y = native.linear(x, index, values, rowptr, w.shape[1], path, kernel)
    exact = x.double() @ w.double().t()
    bound = gamma(w.shape[1]) * (x.double().abs() @ w.double().abs().t())
    assert y.dtype == torch.float32 and y.shape == (x.shape[0], w.shape[0])
    assert bool(((y.double() - exact).abs() <= bound).all()), (path, w.shape, x.shape)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_path_computes_the_linear_within_the_dot_product_bound(kernel, path, dtype):
    before = native.calls(path, kernel)
    n = 0
    # widths around the vector lengths (8, 16) and the mask word (64), and tokens around the
    # tiles (bitmask 4, 6; gather's gathers up to 3, then tiles of 8 and 16), at sparsities
    # from none to all
    for cols in (1, 7, 16, 17, 63, 64, 65, 130):
        for sparsity in (0.0, 0.5, 0.9, 1.0):
            w = _weight(13, cols, sparsity, cols, dtype)
            for tokens in (1, 2, 3, 4, 5, 6, 9, 13, 17, 64):
                _check(w, torch.randn(tokens, cols), path, kernel)
                n += 1
        for tokens in (1, 7, 20):
            _check(_adversarial(9, cols).to(dtype), torch.randn(tokens, cols), path, kernel)
            n += 1
    assert native.calls(path, kernel) - before == n  # the compiled path itself ran each one


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("path", PATHS)
def test_an_empty_row_gives_zero_and_a_full_row_the_dense_product(path, kernel):
    w = torch.zeros(3, 40)
    w[1] = 1.0
    layout = native.layout_of_weight(w, torch.float32, kernel)
    for tokens in (1, 20):  # gathers, tiles
        x = torch.arange(40, dtype=torch.float32).repeat(tokens, 1)
        y = native.linear(x, *layout, 40, path, kernel)
        assert y.tolist() == [[0.0, 780.0, 0.0]] * tokens  # integers: exact in any order


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("path", PATHS)
def test_the_same_bits_whatever_the_thread_count(path, kernel):
    """Each output is summed by one thread in a fixed order (rows split, never a sum)."""
    w, threads = _weight(203, 300, 0.6, 3), torch.get_num_threads()
    layout = native.layout_of_weight(w, torch.float32, kernel)
    tokens = (1, 9, 17)
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs += [
                native.linear(
                    torch.randn(t, 300, generator=torch.Generator().manual_seed(t)),
                    *layout,
                    300,
                    path,
                    kernel,
                )
                for t in tokens
            ]
    finally:
        torch.set_num_threads(threads)
    k = len(tokens)
    assert all(torch.equal(a, b) for a, b in zip(outs[:k], outs[k : 2 * k]))
    assert all(torch.equal(a, b) for a, b in zip(outs[:k], outs[2 * k :]))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("path", PATHS)
def test_rows_read_as_streams_have_the_bits_of_a_row_alone(path, kernel):
    """One token reads a thread's rows as four far-apart streams at once (cpu.h `streams`: rows
    k, k + q, k + 2q, k + 3q, the rest alone); each row is summed in the order it has alone, so
    rows of different lengths in one group give the bits of their one-row products."""
    w, x, threads = _weight(37, 300, 0.6, 7), torch.randn(1, 300), torch.get_num_threads()
    assert len(set((w != 0).sum(1).tolist())) > 5  # rows of many lengths share the groups
    try:
        torch.set_num_threads(1)  # one part: q = 9, rows 0-35 in groups, 36 alone
        layouts = [native.layout_of_weight(v, torch.float32, kernel) for v in (w, *w.split(1))]
        y, *alone = [native.linear(x, *la, 300, path, kernel) for la in layouts]
    finally:
        torch.set_num_threads(threads)
    _check(w, x, path, kernel)
    assert torch.equal(y, torch.cat(alone, 1))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("path", PATHS)
def test_a_product_over_many_cache_panels_has_the_bits_of_its_parts(path, kernel):
    """Many tokens of a wide input run in cache-sized panels of rows x tokens (cpu.h: at 4096
    columns a panel holds 12-16 tokens and 28-60 rows); panels change no tile, so every output
    has the bits it has when its rows or its tokens are multiplied alone, within the bound."""
    w, x = _weight(100, 4096, 0.5, 5), torch.randn(40, 4096)
    y = native.linear(x, *native.layout_of_weight(w, torch.float32, kernel), 4096, path, kernel)
    _check(w, x, path, kernel)
    first = native.linear(x[:20], *native.layout_of_weight(w, torch.float32, kernel), 4096,
                          path, kernel)  # fmt: skip
    rows = native.linear(x, *native.layout_of_weight(w[37:], torch.float32, kernel), 4096,
                         path, kernel)  # fmt: skip
    assert torch.equal(y[:20], first) and torch.equal(y[:, 37:], rows)


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_forced_path_is_the_one_that_runs(monkeypatch, kernel):
    w, x = _weight(32, 96, 0.5, 4), torch.randn(2, 96)
    for path in PATHS:
        monkeypatch.setenv(native.ENV_PATH, path)
        form = sparse_form(w, kernel)
        before = native.calls(path, kernel)
        form(x)
        assert form.path == path and native.calls(path, kernel) == before + 1


def test_a_path_that_is_not_one_or_not_here_is_refused_in_one_line(monkeypatch):
    from sparsebench.evaluation.speed import SpeedSpec

    monkeypatch.setenv(native.ENV_PATH, "avx1024")
    with pytest.raises(SparsebenchError, match=r"'avx1024' is not a path; allowed: auto, "):
        SpeedSpec(enabled=True)  # refused when the run's options are read, before any work
    SpeedSpec(enabled=True, kernels=("csr16",))  # a run that does not time the kernel is fine
    missing = [p for p in native.PATHS if p not in PATHS]
    if missing:  # e.g. avx512 on an AVX2-only CPU
        monkeypatch.setenv(native.ENV_PATH, missing[0])
        with pytest.raises(SparsebenchError, match="this CPU lacks it; allowed here"):
            native.chosen_path()


@pytest.fixture
def masks_mode():
    """Sets bitmask.cpp's masks mode (0 loads, 1 moves); decides it again afterwards."""
    yield lambda mode: torch.ops.sparsebench.bitmask_masks(mode)
    torch.ops.sparsebench.bitmask_masks(2)


@pytest.mark.skipif("avx512" not in PATHS, reason="this CPU has no AVX-512")
def test_both_ways_of_taking_the_masks_give_the_same_bits(masks_mode):
    """The AVX-512 one-token loop moves a mask word's quarters into mask registers or loads them
    (measured once a process, bitmask.cpp): each within the bound, and the same bits, on random
    and adversarial masks of widths that end in every quarter of a word, grouped or alone."""
    ws = (_adversarial(37, 300), _weight(41, 64 * 3 + 17, 0.5, 2), _weight(9, 40, 0.9, 3))
    xs = [torch.randn(1, w.shape[1]) for w in ws]
    ys = {}
    for mode in (0, 1):
        assert masks_mode(mode) == mode
        for w, x in zip(ws, xs):
            _check(w, x, "avx512", "bitmask")
        ys[mode] = [native.linear(x, *native.layout_of_weight(w, torch.float32), w.shape[1],
                                  "avx512") for w, x in zip(ws, xs)]  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(ys[0], ys[1]))


def test_the_masks_mode_is_forced_or_refused_in_one_line(monkeypatch, masks_mode):
    from sparsebench.evaluation.speed import SpeedSpec

    for name, mode in (("loads", 0), ("moves", 1)):
        monkeypatch.setenv(native.ENV_MASKS, name)
        assert masks_mode(2) == mode and native.expand_masks() == name
    monkeypatch.setenv(native.ENV_MASKS, "fast")
    with pytest.raises(SparsebenchError, match=r"'fast' is not a mode; allowed: auto, loads, mo"):
        SpeedSpec(enabled=True)  # refused when the run's options are read, before any work
    monkeypatch.delenv(native.ENV_MASKS)


def test_the_export_is_the_inference_format():
    """A bitmask export's entry becomes the kernel's form without a dense weight: the same
    values tensor and the same bits (reordered within bytes), so the same product."""
    w = _weight(24, 100, 0.7, 5)
    values, bits = pack(w, w != 0)
    a, b = Bitmask.from_export(values, bits, w.shape), sparse_form(w, "bitmask")
    assert torch.equal(a.values[: values.numel()], values) and torch.equal(a.bits, b.bits)
    x = torch.randn(3, 100)
    assert torch.equal(a(x), b(x))
    # bytes: 1 bit per weight (rows padded to 64) + 4 per kept value + the row pointers
    nnz = int((w != 0).sum())
    assert a.bytes == 24 * 2 * 8 + 4 * nnz + 8 * 25
    # the gather form: 2 bytes of column per kept value instead of the bits
    g = Gather(w)
    assert g.bytes == 6 * nnz + 8 * 25
    assert torch.equal(g.bits[:nnz].long() % 65536, (w != 0).nonzero()[:, 1])


@pytest.mark.parametrize("path", PATHS)
def test_gather_reads_columns_past_32767_as_unsigned(path):
    """The 16-bit columns are stored in an int16 tensor; 40000 must not read as -25536."""
    w = torch.zeros(3, 40000)
    w[0, 39999], w[1, 32768], w[2, 0] = 2.0, -1.0, 3.0
    x = torch.arange(40000, dtype=torch.float32).repeat(5, 1)  # 5 tokens: tiles
    for xs in (x[:1], x):
        y = native.linear(xs, *native.layout_of_weight(w, torch.float32, "gather"), 40000, path,
                          "gather")  # fmt: skip
        assert y.tolist() == [[79998.0, -32768.0, 0.0]] * xs.shape[0]
    wide = torch.zeros(2, 65537)
    why = unavailable("gather", torch.device("cpu"), "unstructured", {"w": wide})
    assert why == "w has more than 65536 columns (16-bit indices)"


def test_no_compiler_leaves_the_other_kernels_and_says_why_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(native, "compiler", lambda: None)
    with pytest.raises(SparsebenchError, match="no C.. compiler found"):
        native.build()
    assert native.main() == 0  # make install goes on
    line = capsys.readouterr().out.strip()
    assert (
        line.startswith("bitmask and gather kernels: unavailable (no C++ compiler found")
        and "\n" not in line
    )
    monkeypatch.setattr(native, "why_unavailable", lambda: "no C++ compiler found (set CXX)")
    why = unavailable("bitmask", torch.device("cpu"), "unstructured", {"w": torch.ones(2, 2)})
    assert why == "the compiled bitmask kernel is unavailable: no C++ compiler found (set CXX)"
    why = unavailable("gather", torch.device("cpu"), "unstructured", {"w": torch.ones(2, 2)})
    assert why == "the compiled gather kernel is unavailable: no C++ compiler found (set CXX)"
    assert (
        unavailable("csr16", torch.device("cpu"), "unstructured", {"w": torch.ones(2, 2)}) is None
    )


@pytest.mark.parametrize("edited", ["gather.cpp", "cpu.h"])
def test_an_edited_source_is_rebuilt_not_served_stale(tmp_path, monkeypatch, edited):
    for f in native.SOURCES + native.HEADERS:
        (tmp_path / f.name).write_text(f.read_text())
    monkeypatch.setattr(native, "SOURCES", tuple(tmp_path / f.name for f in native.SOURCES))
    monkeypatch.setattr(native, "HEADERS", tuple(tmp_path / f.name for f in native.HEADERS))
    first = native._library_path(native.compiler())
    (tmp_path / edited).write_text((tmp_path / edited).read_text() + "\n// edited\n")
    assert native._library_path(native.compiler()) != first
    assert os.path.basename(first).startswith("sparsebench_bitmask_")
