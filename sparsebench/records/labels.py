"""A run's name in every record: its label (method, preset, allocation, refinement, recovery,
quantization), and whether a row is its protocol's dense reference."""

from __future__ import annotations

from typing import Any


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def quant_tag(cfg: dict[str, Any]) -> str | None:
    """ "gptq w4", "rtn w3 g128", "gptq w4 joint": a quantized run's part of its label."""
    quant = _dict(cfg.get("quant"))
    name = quant.get("name")
    if not name or name == "none":
        return None
    group = quant.get("group_size", -1)
    return (
        f"{name} w{quant.get('bits', '?')}"
        + (f" g{group}" if group not in (-1, None) else "")
        + (" sym" if quant.get("sym") else "")
        + (" act_order" if quant.get("act_order") else "")
        + (" joint" if quant.get("joint") else "")
    )


def dense_row(r: dict[str, Any]) -> bool:
    """The dense reference of its protocol: method=dense, unquantized (a quantized dense
    model is a result of its own, not what "% of dense" divides by)."""
    return r["method"] == "dense" and not r.get("quant")


def label_of(cfg: dict[str, Any]) -> str:
    method = _dict(cfg.get("method"))
    label = str(method.get("preset") or method.get("name", "?"))
    recover = _dict(cfg.get("recover")).get("preset") or _dict(cfg.get("recover")).get("name")
    refine = _dict(cfg.get("refine")).get("name")
    schedule = _dict(cfg.get("schedule"))
    allocation = schedule.get("allocation")
    if allocation and allocation != "uniform":  # OWL + Wanda is its own row
        preset = _dict(schedule.get(allocation)).get("preset")  # evopress_cpu: the CPU preset
        label = f"{preset or allocation}-{label}"
    if refine and refine != "none":  # wanda + dsnot
        label += f" + {refine}"
    label += f"+{recover}" if recover and recover != "none" else ""
    tag = quant_tag(cfg)
    return label + (f" + {tag}" if tag else "")
