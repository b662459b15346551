"""The report's plots: perplexity against sparsity per method (report.png) and against the
number of non-zero parameters (report_nonzero.png), WikiText-2 and C4 side by side, log-scale
perplexity, one colour per method label in every plot, seed folds as dodged error bars."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def _series(rows, x_key: str, metric: str):
    protocols = defaultdict(set)
    for r in rows:
        if r["status"] == "complete":
            protocols[r["model"]].add(r.get("protocol"))
    series = defaultdict(list)
    for r in rows:
        if (
            r["status"] == "complete"
            and r[metric]
            and r["pattern"] == "unstructured"
            and r.get(x_key) is not None
        ):
            # one line per protocol: seqlen 512 and 2048 are different curves, never one
            tag = (
                r["model"]
                if len(protocols[r["model"]]) == 1
                else f"{r['model']}, protocol {str(r.get('protocol'))[:8]}"
            )
            series[(tag, r["label"], r["method"] == "dense")].append(
                (r[x_key], r[metric], r.get(f"{metric}_std"))
            )
    return series


def _colours(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One colour per method label, the same in every plot of the report."""
    import matplotlib

    labels = sorted({r["label"] for r in rows if r["method"] != "dense"})
    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


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
    """Perplexity against sparsity per method(+recovery), WikiText-2 and C4 side by side;
    error bars (seed folds) dodged apart."""
    colours = _colours(rows)

    def draw(ax, metric):
        series = sorted(_series(rows, "sparsity", metric).items())
        curves = [s for s in series if not s[0][2]]
        for (tag, label, dense), pts in series:
            if dense:
                ax.axhline(sorted(pts)[0][1], color="gray", ls="--", lw=1, label=f"dense ({tag})")
        for i, ((tag, label, _), pts) in enumerate(curves):
            pts.sort()
            dx = _dodge(i, len(curves), 0.004)
            ax.errorbar(
                [p[0] + dx for p in pts],
                [p[1] for p in pts],
                yerr=[p[2] or 0 for p in pts],
                marker="o",
                capsize=3,
                color=colours.get(label),
                label=f"{label} ({tag})",
            )

    _figure(path, "sparsity", draw)


def plot_nonzero(rows: list[dict[str, Any]], path: Path) -> None:
    """Perplexity against the number of non-zero parameters (Elsa's Figure 3), log-log."""
    colours = _colours(rows)

    def draw(ax, metric):
        curves = sorted(_series(rows, "nonzero_params", metric).items())
        for i, ((tag, label, dense), pts) in enumerate(curves):
            pts.sort()
            f = 1 + _dodge(i, len(curves), 0.01)  # multiplicative: the x axis is log
            ax.errorbar(
                [p[0] * f for p in pts],
                [p[1] for p in pts],
                yerr=[p[2] or 0 for p in pts],
                marker="*" if dense else "o",
                ls="none" if dense else "-",
                capsize=3,
                color="gray" if dense else colours.get(label),
                label=f"{label} ({tag})",
            )

    _figure(path, "non-zero parameters (log)", draw, log_x=True)


def plot_speed(rows: list[dict[str, Any]], path: Path) -> None:
    """Decode speed-up over the dense kernel (one sequence, KV cache) against sparsity, one line
    per method and pattern; 1 (no gain) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = _colours(rows)
    series = defaultdict(list)
    for r in rows:
        if r["status"] == "complete" and r.get("decode_speedup") and r["method"] != "dense":
            series[(r["label"], r["pattern"])].append((r["sparsity"], r["decode_speedup"]))
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    ax.axhline(1.0, color="gray", ls="--", lw=1, label="dense kernel")
    for (label, pattern), pts in sorted(series.items()):
        pts.sort()
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o" if pattern == "unstructured" else "s",
            ls="-" if pattern == "unstructured" else ":",
            color=colours.get(label),
            label=f"{label} ({pattern})",
        )
    ax.set_xlabel("sparsity")
    ax.set_ylabel("decode speed-up over dense (x)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
