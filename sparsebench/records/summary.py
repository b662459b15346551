"""What the console says at the end: one run's table (in the style of lm-eval's), and a
sweep's counts. Plain text from results.json's fields; nothing here computes a number."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _table(head: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

    def line(cells):
        return (
            "| "
            + " | ".join(
                str(c).rjust(w) if i in right else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            )
            + " |"
        )

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)
        )
        + "|"
    )
    return [line(head), sep, *(line(r) for r in rows)]


def run_summary(res: dict[str, Any], results_path: Path, extra: list[str] = ()) -> str:
    """The end-of-run summary of a results.json's content."""
    cfg = res.get("config") or {}
    method = (cfg.get("method") or {}).get("preset") or (cfg.get("method") or {}).get("name", "?")
    recover = (cfg.get("recover") or {}).get("preset") or (cfg.get("recover") or {}).get("name")
    if recover and recover != "none":
        method += f" + {recover}"
    sp = res.get("sparsity") or {}
    model = (cfg.get("model") or {}).get("name", "?")
    what = (
        "dense"
        if method == "dense"
        else f"{method} at {sp.get('target', cfg.get('sparsity'))} ({sp.get('pattern', '?')})"
    )
    lines = [f"sparsebench: {what} on {model}: {res.get('status', '?')}", ""]
    metrics = res.get("metrics") or {}
    ppl = [
        [name, f"{metrics[name]:.4f}", str(metrics.get(f"{name}_windows", "?"))]
        for name in ("wikitext2", "c4")
        if isinstance(metrics.get(name), (int, float))
    ]
    if ppl:
        seqlen = (res.get("model") or {}).get("seqlen", "?")
        lines += _table(["dataset", "perplexity", f"windows of {seqlen}"], ppl, {1, 2}) + [""]
    elif res.get("evaluation"):
        lines += [f"evaluation: {res['evaluation']}", ""]
    zs = res.get("zeroshot") or {}
    if zs.get("tasks"):
        rows = []
        for task, v in zs["tasks"].items():
            key = (
                "acc_norm"
                if zs.get("headline") == "acc_norm" and v.get("acc_norm") is not None
                else "acc"
            )
            err = v.get(f"{key}_stderr")
            rows.append(
                [
                    task,
                    key,
                    f"{v['headline']:.4f}",
                    "" if err is None else f"± {err:.4f}",
                    str(v.get("n", "?")),
                ]
            )
        rows.append(["mean", zs.get("headline", "acc"), f"{zs['mean_acc']:.4f}", "", ""])
        lines += _table(["task", "metric", "value", "stderr", "docs"], rows, {2, 4}) + [""]
    if sp:
        lines.append(
            f"sparsity: target {sp.get('target')}, actual {sp.get('actual_sparsity', 0):.6f} over "
            f"{sp.get('prunable_params', 0):,} prunable weights ({sp.get('pruned_params', 0):,} "
            "pruned)"
            + (
                f"; {sp['sparsity_of_block_params']:.6f} of all {sp['block_params']:,} block "
                "weights"
                if sp.get("block_params")
                else ""
            )
        )
    lines += _speed_lines(res.get("speed") or {}, res.get("size") or {})
    times = res.get("timings_s") or {}
    if times:
        lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    mem = res.get("memory") or {}
    if mem:
        lines.append(
            "peak memory: "
            + ", ".join(
                f"{k.removeprefix('peak_').removesuffix('_gib')} {v:.2f} GiB"
                for k, v in mem.items()
            )
        )
    lines += list(extra)
    lines.append(f"results: {results_path}")
    return "\n".join(lines)


def _speed_lines(speed: dict[str, Any], size: dict[str, Any]) -> list[str]:
    """What the sparsity bought (eval.speed, results.json size), in two lines."""
    lines = []
    if "speedup" in speed:
        d, s, x = speed["dense"], speed["sparse"], speed["speedup"]
        lines.append(
            f"speed ({speed['device']}, {speed['kernel']} / {speed['prefill_kernel']}): decode "
            f"{d['decode_ms_b1']:.1f} -> {s['decode_ms_b1']:.1f} ms/token ({x['decode_b1']:.2f}x "
            f"dense; the bandwidth floor allows {x['floor']:.2f}x), prefill "
            f"{x['prefill_b1']:.2f}x dense"
        )
    elif "skipped" in speed or "failed" in speed:
        lines.append(f"speed: {speed.get('skipped') or 'failed: ' + speed['failed']}")
    pruned = size.get("pruned_weights") or {}
    if size.get("bitmask_over_dense") and pruned.get("nonzero", 0) < pruned.get("weights", 0):
        dense_mb, bitmask_mb = size["model_dense"] / 1e6, size["model_bitmask"] / 1e6
        lines.append(
            f"size: {dense_mb:,.0f} MB dense, {bitmask_mb:,.0f} MB with the pruned weights as "
            f"bitmask + values ({size['bitmask_over_dense']:.2f}x; save.format=bitmask)"
        )
    return lines


def sweep_summary(
    sweep_dir: Path,
    done: list[str],
    skipped: list[str],
    failed: list[str],
    baselines: dict[str, str],
) -> str:
    """The end-of-sweep summary: counts, failed jobs, where it all is, the report command."""
    lines = [
        "",
        f"sparsebench sweep: {len(done)} done, {len(skipped)} skipped (already complete), "
        f"{len(failed)} failed",
    ]
    for folder, state in sorted(baselines.items()):
        lines.append(f"  dense baseline: {folder} ({state})")
    for line in failed:
        lines.append(f"  failed: {line}")
    lines += [f"folder: {sweep_dir}", f"table and plots: sparsebench-report {sweep_dir}"]
    return "\n".join(lines)
