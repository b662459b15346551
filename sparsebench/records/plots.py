"""The report's plots: perplexity against sparsity per method (report.png) and against the
number of non-zero parameters (report_nonzero.png), WikiText-2 and C4 side by side, log-scale
perplexity, one colour per (model, method label) in every plot, N:M runs as square markers,
seed folds as dodged error bars; the decode speed-up (report_speed.png) as the table shows it.
Every row of the table is in the perplexity plots, or `not_plotted` says why not."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from .labels import dense_row


def _plotted(r: dict[str, Any], metric: str, x_key: str) -> bool:
    return r["status"] == "complete" and bool(r.get(metric)) and r.get(x_key) is not None


def not_plotted(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """The rows of the table that neither perplexity plot shows, each with the reason (the
    report lists them under the table)."""
    out = []
    for r in rows:
        if any(_plotted(r, m, "sparsity") for m in ("wikitext2", "c4")):
            continue
        if r["status"] != "complete":
            why = f"{r['status']}: it has no result to plot"
        elif r.get("sparsity") is None:
            why = "no sparsity in its results.json"
        else:
            why = "no perplexity was measured" + (
                " (random weights: measurements only)" if "random weights" in r["label"] else ""
            )
        out.append((r, why))
    return out


def _tags(rows) -> dict[str, str]:
    """A row's model name in the plots, with its protocol where a model has several (seqlen
    512 and 2048 are different curves, never one)."""
    protocols = defaultdict(set)
    for r in rows:
        if r["status"] == "complete":
            protocols[r["model"]].add(r.get("protocol"))
    return {
        r["path"]: r["model"]
        if len(protocols[r["model"]]) <= 1
        else f"{r['model']}, protocol {str(r.get('protocol'))[:8]}"
        for r in rows
    }


def _series(rows, x_key: str, metric: str):
    """{(model tag, label, dense, pattern): [(x, y, yerr)]}: unstructured rows as curves,
    each N:M pattern as points of its own."""
    tags = _tags(rows)
    series = defaultdict(list)
    for r in rows:
        if _plotted(r, metric, x_key):
            key = (tags[r["path"]], r["label"], dense_row(r), r["pattern"])
            series[key].append((r[x_key], r[metric], r.get(f"{metric}_std")))
    return series


def _colours(rows: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    """One colour per (model, method label), the same in every plot of the report; the dense
    lines are grey, one dash style per model."""
    import matplotlib

    tags = _tags(rows)
    keys = sorted({(tags[r["path"]], r["label"]) for r in rows if not dense_row(r)})
    cmap = matplotlib.colormaps["tab10" if len(keys) <= 10 else "tab20"]
    return {key: cmap(i % cmap.N) for i, key in enumerate(keys)}


DENSE_STYLES = ("--", "-.", ":", (0, (5, 1)))


def _style(pattern: str) -> dict[str, Any]:
    """Unstructured: a line with round markers; an N:M pattern: square markers, no line."""
    return {"marker": "o"} if pattern == "unstructured" else {"marker": "s", "ls": "none"}


def _plain_log_axis(axis) -> None:
    """Log scale with plain tick labels (250, 1000, 1e+05 only where needed), not 2.58x10^2."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}" if v < 1e6 else f"{v:.0e}"))
    axis.set_minor_formatter(NullFormatter())


def _figure(
    path: Path, xlabel: str, draw, metrics=("wikitext2", "c4"), log_x: bool = False
) -> None:
    """WikiText-2 and C4 side by side, log-scale perplexity: `draw(ax, metric)` plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(metrics), figsize=(5.5 * len(metrics), 4), dpi=120, squeeze=False
    )
    for ax, metric in zip(axes[0], metrics):
        draw(ax, metric)
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis)
        if log_x:
            ax.set_xscale("log")
            _plain_log_axis(ax.xaxis)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(
            f"{ {'wikitext2': 'WikiText-2', 'c4': 'C4'}.get(metric, metric) } perplexity (log)"
        )
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][-1].legend(handles, labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _dodge(index: int, count: int, width: float) -> float:
    """A small x offset per series, so error bars at the same sparsity never overlap."""
    return (index - (count - 1) / 2) * width


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Perplexity against sparsity per model and method(+recovery), WikiText-2 and C4 side by
    side; N:M runs as square markers at 0.5; error bars (seed folds) dodged apart."""
    colours = _colours(rows)

    def draw(ax, metric):
        series = sorted(_series(rows, "sparsity", metric).items(), key=str)
        curves = [s for s in series if not s[0][2]]
        models = sorted({tag for (tag, _, _, _), _ in series})
        for (tag, label, dense, _), pts in series:
            if dense:
                ls = DENSE_STYLES[models.index(tag) % len(DENSE_STYLES)]
                ax.axhline(sorted(pts)[0][1], color="gray", ls=ls, lw=1, label=f"dense ({tag})")
        for i, ((tag, label, _, pattern), pts) in enumerate(curves):
            pts.sort()
            dx = _dodge(i, len(curves), 0.004)
            suffix = "" if pattern == "unstructured" else f", {pattern}"
            ax.errorbar(
                [p[0] + dx for p in pts],
                [p[1] for p in pts],
                yerr=[p[2] or 0 for p in pts],
                capsize=3,
                color=colours.get((tag, label)),
                label=f"{label} ({tag}{suffix})",
                **_style(pattern),
            )

    _figure(path, "sparsity", draw)


def plot_nonzero(rows: list[dict[str, Any]], path: Path) -> None:
    """Perplexity against the number of non-zero parameters (Elsa's Figure 3), log-log."""
    colours = _colours(rows)

    def draw(ax, metric):
        curves = sorted(_series(rows, "nonzero_params", metric).items(), key=str)
        for i, ((tag, label, dense, pattern), pts) in enumerate(curves):
            pts.sort()
            f = 1 + _dodge(i, len(curves), 0.01)  # multiplicative: the x axis is log
            style = {"marker": "*", "ls": "none"} if dense else _style(pattern)
            suffix = "" if pattern == "unstructured" or dense else f", {pattern}"
            ax.errorbar(
                [p[0] * f for p in pts],
                [p[1] for p in pts],
                yerr=[p[2] or 0 for p in pts],
                capsize=3,
                color="gray" if dense else colours.get((tag, label)),
                label=f"{label} ({tag}{suffix})",
                **style,
            )

    _figure(path, "non-zero parameters (log)", draw, log_x=True)


def bits_series(rows: list[dict[str, Any]], metric: str) -> dict[tuple, list[tuple]]:
    """{(model tag, method label without its quantization, quantizer, sparsity, pattern):
    [(bits per weight, perplexity, std)]}: one line per method, sparsity and quantizer across
    bit widths; an unquantized run is the float end of every line of its method and sparsity."""
    tags = _tags(rows)
    series = defaultdict(list)
    floats = defaultdict(list)
    for r in rows:
        if not _plotted(r, metric, "bits_per_weight"):
            continue
        tag = r.get("quant")
        base = r["label"][: -len(f" + {tag}")] if tag else r["label"]
        where = (tags[r["path"]], base, r.get("sparsity"), r["pattern"])
        point = (r["bits_per_weight"], r[metric], r.get(f"{metric}_std"))
        if tag:  # one line across bit widths: the tag without its "w<bits>" (joint apart)
            quantizer = " ".join(w for w in tag.split(" ") if not w[1:].isdigit() or w[0] != "w")
            series[(*where[:2], quantizer, *where[2:])].append(point)
        else:
            floats[where].append(point)
    for (tag, base, quantizer, sparsity, pattern), pts in series.items():
        pts += floats.get((tag, base, sparsity, pattern), [])
    return series


def plot_bits(rows: list[dict[str, Any]], path: Path) -> None:
    """Perplexity against the bits a stored weight of the pruned linears needs
    (report_bits.png): "50% + 4 bits or dense 3 bits" read off one figure; GPTQ lines solid,
    round to nearest dashed, N:M with square markers."""
    import matplotlib

    def draw(ax, metric):
        series = sorted(bits_series(rows, metric).items(), key=str)
        bases = sorted({(tag, base) for (tag, base, *_), _ in series})
        cmap = matplotlib.colormaps["tab10" if len(bases) <= 10 else "tab20"]
        for (tag, base, quantizer, sparsity, pattern), pts in series:
            pts.sort()
            at = f" {sparsity:g}" if pattern == "unstructured" else f" {pattern}"
            ax.errorbar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                yerr=[p[2] or 0 for p in pts],
                capsize=3,
                color=cmap(bases.index((tag, base)) % cmap.N),
                ls="-" if quantizer.startswith("gptq") else "--",
                marker="o" if pattern == "unstructured" else "s",
                label=f"{base}{'' if base == 'dense' else at}, {quantizer} ({tag})",
            )

    _figure(path, "bits per weight of the pruned linears (log)", draw, log_x=True)


def speed_series(rows: list[dict[str, Any]]) -> dict[tuple, list[tuple]]:
    """{(model tag, label, pattern): [(sparsity, decode speed-up, its std, suspect)]}: the
    table's "decode x" cells, as the speed plot draws them."""
    tags = _tags(rows)
    series = defaultdict(list)
    for r in rows:
        if r["status"] == "complete" and r.get("decode_speedup") and r["method"] != "dense":
            key = (tags[r["path"]], r["label"], r["pattern"])
            std = r.get("decode_speedup_std") or 0
            series[key].append((r["sparsity"], r["decode_speedup"], std, bool(r["speed_suspect"])))
    return series


def plot_speed(rows: list[dict[str, Any]], path: Path) -> None:
    """Decode speed-up over the dense kernel (one sequence, KV cache) against sparsity, what
    the table's "decode x" column shows: the mean over the runs folded with its std as an error
    bar, one line per model, method and pattern; a suspect measurement as a hollow marker; 1
    (no gain) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours, series = _colours(rows), speed_series(rows)
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    ax.axhline(1.0, color="gray", ls="--", lw=1, label="dense kernel")
    for (tag, label, pattern), pts in sorted(series.items()):
        pts.sort()
        colour = colours.get((tag, label))
        suspect = any(p[3] for p in pts)
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] for p in pts],
            capsize=3,
            color=colour,
            label=f"{label} ({tag}, {pattern})" + (" (suspect: hollow)" if suspect else ""),
            **_style(pattern),
        )
        hollow = [p for p in pts if p[3]]
        if hollow:
            ax.plot(
                [p[0] for p in hollow], [p[1] for p in hollow], "o", ms=10, mfc="white",
                mec=colour, ls="none",
            )  # fmt: skip
    ax.set_xlabel("sparsity")
    ax.set_ylabel("decode speed-up over dense (x)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_tradeoff(rows: list[dict[str, Any]], path: Path) -> None:
    """Perplexity against the measured decode speed-up (report_tradeoff.png), one point per
    row: structured runs (a smaller dense model against the model before the cut) as
    triangles, unstructured and N:M runs (their best sparse kernel against the dense kernel) as
    circles and squares; the trade-off between them read off one figure."""
    colours = _colours(rows)
    tags = _tags(rows)

    def draw(ax, metric):
        ax.axvline(1.0, color="gray", ls="--", lw=1)
        seen = set()
        for r in rows:
            if r["status"] != "complete" or not r.get("decode_speedup") or r.get(metric) is None:
                continue
            shape = (
                "^"
                if r["pattern"] == "structured"
                else "o"
                if r["pattern"] == "unstructured"
                else "s"
            )
            label = f"{r['label']} ({tags[r['path']]}, {r['pattern']})"
            ax.errorbar(
                r["decode_speedup"],
                r[metric],
                xerr=r.get("decode_speedup_std") or 0,
                yerr=r.get(f"{metric}_std") or 0,
                marker=shape,
                ls="none",
                capsize=3,
                color=colours.get((tags[r["path"]], r["label"])),
                label=None if label in seen else label,
            )
            ax.annotate(f"{r['sparsity']:g}", (r["decode_speedup"], r[metric]), fontsize=6)
            seen.add(label)

    _figure(path, "decode speed-up over the dense model (x; one sequence, KV cache)", draw)


def plot_allocation(rows: list[dict[str, Any]], path: Path) -> None:
    """Each block's sparsity under a non-uniform allocation (OWL's targets, EvoPress's
    realized share of each block), one line per run, the run's target dashed: the allocations
    side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = _tags(rows)
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    targets = set()
    for r in sorted(rows, key=lambda r: (r["sparsity"] or 0, r["label"])):
        blocks = r.get("block_targets")
        if r["status"] != "complete" or not blocks:
            continue
        targets.add(r["sparsity"])
        ax.plot(range(len(blocks)), blocks, marker=".", lw=1,
                label=f"{r['label']} at {r['sparsity']} ({tags[r['path']]})")  # fmt: skip
    for s in sorted(t for t in targets if t is not None):
        ax.axhline(s, color="gray", ls="--", lw=1)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity of the block's pruned linears")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
