"""What the console says at the end: one run's table (in the style of lm-eval's), and a
sweep's counts. Plain text from results.json's fields; nothing here computes a number."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .labels import quant_tag


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


def describe_cut(cut: dict[str, Any]) -> str:
    """What a structured run removed, in words (results.json sparsity.structure)."""
    what = f"{cut['block_params_removed']:,} of {cut['block_params_before']:,} weights"
    if "removed_blocks" in cut:
        n = len(cut["removed_blocks"])
        return f"{n} of {cut['blocks_before']} decoder blocks {cut['removed_blocks']} ({what})"
    if "kept_experts" in cut:
        return (
            f"{cut['experts_before'] - cut['experts_after']} of {cut['experts_before']} experts "
            f"of each of {len(cut['kept_experts'])} MoE layers ({what})"
        )
    heads = [w["kv_heads"] for w in cut["widths"]]
    ch = [w["channels"] for w in cut["widths"]]
    return (
        f"key/value groups kept per block {min(heads)}-{max(heads)} of {cut['kv_heads_before']}, "
        f"MLP channels {min(ch)}-{max(ch)} of {cut['channels_before']} ({what})"
    )


def run_summary(res: dict[str, Any], results_path: Path, extra: list[str] = ()) -> str:
    """The end-of-run summary of a results.json's content."""
    cfg = res.get("config") or {}
    method = (cfg.get("method") or {}).get("preset") or (cfg.get("method") or {}).get("name", "?")
    recover = (cfg.get("recover") or {}).get("preset") or (cfg.get("recover") or {}).get("name")
    refine = (cfg.get("refine") or {}).get("name")
    if refine and refine != "none":
        method += f" + {refine}"
    if recover and recover != "none":
        method += f" + {recover}"
    tag = quant_tag(cfg)
    method += f" + {tag}" if tag else ""
    sp = res.get("sparsity") or {}
    model = (cfg.get("model") or {}).get("name", "?")
    what = (
        "dense"
        if method == "dense"
        else f"{method} at {sp.get('target', cfg.get('sparsity'))} ({sp.get('pattern', '?')})"
    )
    source = res.get("loaded_pruned_model") or {}
    if source:  # an export evaluated again: the pruned model it is, never "dense"
        label = source.get("label") or source.get("method", "?")
        label += f" + {recover}" if recover and recover != "none" else ""
        what = f"{label} at {source.get('sparsity')} ({sp.get('pattern', '?')})"
        where = (cfg.get("model") or {}).get("path")
        model = f"{source.get('model', model)}, reloaded from {where}"
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
    warnings = (res.get("method_report") or {}).get("warnings") or []
    lines += [f"WARNING: {w}" for w in warnings] + ([""] if warnings else [])
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
    cut = (sp or {}).get("structure")
    if cut:  # a structured run: what was removed, not zeros
        lines.append(
            f"sparsity: target {sp.get('target')}, actual {sp['actual_sparsity']:.6f} of the "
            f"blocks' weights removed: {describe_cut(cut)}; the kept model is dense "
            f"({sp.get('nonzero_params', 0):,} parameters)"
        )
    elif sp and sp.get("split"):  # a sparse + low-rank run (OATS): parameters removed
        split = sp["split"]
        lines.append(
            f"sparsity: target {sp.get('target')}, actual {sp['actual_sparsity']:.6f} of the "
            f"{sp.get('prunable_params', 0):,} parameters of the pruned linears removed, each "
            f"held as S + U V: S keeps {split['sparse_kept_params']:,} "
            f"({split['sparse_part_sparsity']:.6f} zeros), the factors "
            f"{split['lowrank_params']:,} ({split['lowrank_share']:.6f})"
        )
        lines.append(f"  S's zeros: {sp['count_rule']}")
    elif sp:
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
        target, actual = sp.get("target"), sp.get("actual_sparsity")
        if sp.get("count_rule") and isinstance(target, (int, float)) and actual != target:
            lines.append(f"  actual vs target: {sp['count_rule']}")
    lines += _speed_lines(res.get("speed") or {}, res.get("size") or {})
    lines += _saved_line(res)
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


def _kernels(speed: dict[str, Any]) -> str:
    """'bitmask (avx512) / bitmask / torch_csr': the kernels at one token, a few, many."""
    names = [speed["kernel"], speed.get("batch_kernel"), speed["prefill_kernel"]]
    names = [f"{k} ({speed[f'{k}_path']})" if f"{k}_path" in speed else k for k in names if k]
    return names[0] if len(set(names)) == 1 else " / ".join(names)


def _kernel_line(speed: dict[str, Any]) -> list[str]:
    """The pruned linears alone at one token: the decode kernel over dense, and each one's
    time over its own bandwidth floor (dense too: a slow dense product is said, not credited)."""
    one, k = speed.get("kernels_one_token") or {}, speed.get("kernel")
    if not one.get(f"{k}_ms") or "dense_over_floor" not in one:
        return []
    return [
        f"  pruned linears alone, one token: {k} {one['dense_ms'] / one[f'{k}_ms']:.2f}x "
        f"dense; measured / floor {one[f'{k}_over_floor']:.2f} ({k}), "
        f"{one['dense_over_floor']:.2f} (dense)"
    ]


def _speed_lines(speed: dict[str, Any], size: dict[str, Any]) -> list[str]:
    """What the sparsity bought (eval.speed, results.json size), in two lines."""
    lines = []
    if "speedup" in speed:
        d, s, x = speed["dense"], speed.get("sparse") or speed["cut"], speed["speedup"]
        lines.append(
            f"speed ({speed['device']}, {_kernels(speed)}): decode "
            f"{d['decode_ms_b1']:.1f} -> {s['decode_ms_b1']:.1f} ms/token ({x['decode_b1']:.2f}x "
            f"dense; the bandwidth floor allows {x['floor']:.2f}x), prefill "
            f"{x['prefill_b1']:.2f}x dense"
            + ("; SUSPECT, see below" if speed.get("suspect") else "")
        )
        lines += _kernel_line(speed)
        lines += [f"  suspect: {reason}" for reason in speed.get("suspect") or []]
    elif "skipped" in speed or "failed" in speed:
        lines.append(f"speed: {speed.get('skipped') or 'failed: ' + speed['failed']}")
    pruned = size.get("pruned_weights") or {}
    if size.get("bitmask_over_dense") and pruned.get("nonzero", 0) < pruned.get("weights", 0):
        lines.append(
            f"size: {human_bytes(size['model_dense'])} dense, "
            f"{human_bytes(size['model_bitmask'])} with the pruned weights as bitmask + values "
            f"({size['bitmask_over_dense']:.2f}x; save.format=bitmask)"
        )
    if size.get("model_before_cut"):  # a structured run: a smaller dense model
        lines.append(
            f"size: {human_bytes(size['model_before_cut'])} before the cut, "
            f"{human_bytes(size['model_dense'])} after ({size['cut_over_dense']:.2f}x; a plain "
            "dense model, no sparse format needed)"
        )
    bits = size.get("bits") or {}
    if bits:
        parts = [f"kept values {human_bytes(bits['values_bits'] / 8)}"]
        parts += [f"mask {human_bytes(bits['mask_bits'] / 8)}"] if bits["mask_bits"] else []
        grids = bits["grid_bits"]
        parts += [f"scales and zero points {human_bytes(grids / 8)}"] if grids else []
        lowrank = bits.get("lowrank_bits")
        parts += [f"low-rank factors {human_bytes(lowrank / 8)}"] if lowrank else []
        lines.append(
            f"bits per parameter: {bits['bits_per_pruned_weight']:.3f} per weight of the pruned "
            f"linears ({', '.join(parts)}), {bits['bits_per_model_param']:.3f} over the whole "
            f"model ({human_bytes(bits['model_bits'] / 8)})"
        )
    return lines


def human_bytes(n: float) -> str:
    """1,234 MB, 12.3 MB, 456 kB: three significant digits or more, never "0 MB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:,.0f} {unit}" if v >= 100 else f"{v:.{1 if v >= 10 else 2}f} {unit}"
    return f"{int(n)} B"


def _saved_line(res: dict[str, Any]) -> list[str]:
    """Where the export went and what it takes on disk (results.json saved_model*)."""
    if not res.get("saved_model"):
        return []
    disk = res.get("saved_model_bytes") or {}
    fmt = (res.get("config") or {}).get("save", {}).get("format", "dense")
    cut = (res.get("sparsity") or {}).get("structure") or {}
    if "widths" in cut and not cut.get("plain_config"):  # sparsebench's loader reads it
        fmt += (
            "; blocks of their own widths, which no transformers config describes: "
            "load it with model=local model.path=<export>"
        )
    return [
        f"saved: {res['saved_model']} (save.format={fmt}: "
        f"{human_bytes(disk.get('weights', 0))} of weights, {human_bytes(disk.get('folder', 0))} "
        "in all on disk)"
        if disk
        else f"saved: {res['saved_model']}"
    ]


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
