"""The check: a plan against the visible (or named) memory, before anything loads, and the
option changes that would make a refused run fit."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import SparsebenchError
from .build import build_plan
from .shapes import GIB, Shapes
from .terms import Knobs, Plan, PlanSpec


def visible_memory(plan_spec: PlanSpec, device: torch.device) -> tuple[float, float | None]:
    """(host GiB available, device GiB total) as this process sees them."""
    host = plan_spec.host_limit_gib
    if host is None:
        host = mem_available_gib()
    dev = plan_spec.device_limit_gib
    if (
        dev is None and device.type == "cuda" and torch.cuda.is_available()
    ):  # a dry run may plan for a GPU it lacks
        dev = torch.cuda.get_device_properties(device).total_memory / GIB
    return host, dev


def mem_available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def alternatives(model_name: str, s: Shapes, k: Knobs) -> list[tuple[str, Knobs]]:
    """Option changes the user can make, each with the plan it would give."""
    out = []
    if k.kind == "train":
        for option_text, changes in k.lighter:  # the method's own lighter variants
            out.append((option_text, replace(k, **dict(changes), lighter=())))
        if not k.checkpointing:
            out.append(("method.grad_checkpointing=true", replace(k, checkpointing=True)))
        if k.act_bytes == 4 and k.device == "cuda":
            out.append(("method.bf16=true", replace(k, act_bytes=2)))
        if k.micro_batch > 1:
            out.append(
                (
                    f"method.grad_accum (micro-batch {k.micro_batch // 2})",
                    replace(k, micro_batch=k.micro_batch // 2),
                )
            )
        if not k.offload and k.device == "cuda":
            out.append(
                ("offload=true (FSDP2 CPU offload)", replace(k, offload=True, engine="fsdp"))
            )
        for w in (2, 4, 8, 16, 32, 64):
            if w > k.world:
                out.append(
                    (f"{w} ranks with FSDP2 (engine=fsdp)", replace(k, world=w, engine="fsdp"))
                )
    else:
        if k.kind == "oneshot" and k.inputs == "device" and k.device == "cuda":
            out.append(("calib_inputs=host", replace(k, inputs="host")))
        if k.kind == "oneshot" and k.calib_batch > 1:
            out.append(("calib_batch=1", replace(k, calib_batch=1)))
        for n in (k.nsamples // 2, k.nsamples // 4):
            if n >= 1:
                out.append((f"data.nsamples={n}", replace(k, nsamples=n)))
        if k.seqlen > 512:
            out.append((f"model.seqlen={k.seqlen // 2}", replace(k, seqlen=k.seqlen // 2)))
    return out


def fits(plan: Plan, plan_spec: PlanSpec, device: torch.device) -> bool:
    """True if the plan fits the visible memory, less the margin."""
    host_avail, dev_avail = visible_memory(plan_spec, device)
    keep = 1 - plan_spec.margin
    return plan.total("host") <= keep * host_avail and (
        dev_avail is None or plan.total("device") <= keep * dev_avail
    )


def fit_verdict(
    plan: Plan, s: Shapes, plan_spec: PlanSpec, device: torch.device
) -> tuple[bool, str]:
    """(fits, one line): whether the plan fits the visible (or named) memory, and if not,
    what it needs and the options that would fit."""
    host_avail, dev_avail = visible_memory(plan_spec, device)
    keep = 1 - plan_spec.margin

    def fits(p: Plan) -> bool:
        return p.total("host") <= keep * host_avail and (
            dev_avail is None or p.total("device") <= keep * dev_avail
        )

    where = f"{host_avail:.1f} GiB host" + (
        f", {dev_avail:.1f} GiB device" if dev_avail is not None else ""
    )
    if device.type == "cuda" and dev_avail is None:  # planning for a GPU this machine does not have
        where += (
            f"; the device's {plan.total('device'):.1f} GiB are not checked: no GPU is visible, "
            f"plan.device_limit_gib=<GiB> names one"
        )
    if fits(plan):
        return True, f"fits: {plan.total('host'):.1f} GiB host" + (
            f", {plan.total('device'):.1f} GiB device" if dev_avail is not None else ""
        ) + f" of {where} (less the {plan_spec.margin:.0%} margin)"
    need = f"{plan.total('host'):.1f} GiB of host memory ({host_avail:.1f} available)"
    if dev_avail is not None and plan.total("device") > keep * dev_avail:
        need = f"{plan.total('device'):.1f} GiB of device memory ({dev_avail:.1f} on the device)"
    alts = alternatives(plan.model, s, plan.knobs)
    ok = [name for name, knobs in alts if fits(build_plan(plan.model, s, knobs))]
    if not ok:  # no single change: the pairs that fit, smallest plan first
        pairs = {}
        for n1, k1 in alts:
            for n2, k2 in alternatives(plan.model, s, k1):
                if n2 != n1 and fits(p2 := build_plan(plan.model, s, k2)):
                    pairs.setdefault(
                        " + ".join(sorted((n1, n2))), p2.total("device") + p2.total("host")
                    )
        ok = sorted(pairs, key=pairs.get)[:4]
    advice = (
        f"options that fit: {'; '.join(ok)}"
        if ok
        else "no single option or pair of options fits: combine more of them, or use a larger "
        "machine"
    )
    if (
        not ok and dev_avail is not None
    ):  # the host may be what stops them: name what fits the device
        dev_ok = [
            n for n, k in alts if build_plan(plan.model, s, k).total("device") <= keep * dev_avail
        ]
        if dev_ok:
            advice = (
                f"options that fit the device but not this host's {host_avail:.1f} GiB: "
                f"{'; '.join(dev_ok[:4])} "
                f"(plan.host_limit_gib=<GiB> plans for the host you will run on)"
            )
    return False, f"does not fit: the memory plan needs {need}; {advice}"


def check_fits(plan: Plan, s: Shapes, plan_spec: PlanSpec, device: torch.device) -> None:
    """Stop before loading when the plan does not fit, naming the options that would."""
    ok, verdict = fit_verdict(plan, s, plan_spec, device)
    if ok or not plan_spec.enforce:
        return
    raise SparsebenchError(
        f"{verdict.removeprefix('does not fit: ')}; plan.enforce=false runs anyway "
        f"(sparsebench dry_run=true ... prints the plan)"
    )
