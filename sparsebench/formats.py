"""How a pruned model is stored, and what each form costs in bytes.

`save.format=dense` (default): transformers' model.safetensors, every weight dense.
`save.format=bitmask`: every pruned weight as its kept values (row-major order, the model's
dtype) plus a 1-bit mask (numpy.packbits, big-endian bit order: weight k is bit 7 - k % 8 of
byte k // 8); everything else dense. The file `sparsebench_bitmask.safetensors` replaces
model.safetensors and reloads to bit-identical weights (`load_bitmask`); its bits are the
export's masks too, stored once (`load_bitmask_masks`): at sparsity s a
weight costs (1 - s) x dtype bytes + 1/8 byte instead of dtype bytes, so at 0.5 in float32
the pruned weights take 2.125 / 4 = 0.53x. A quantized run's kept values are stored as b-bit
codes with their grid (`__codes`, `__scale`, `__zero`, `__grid`) and dequantize to its weights
bit for bit. Tensors that are not pruned (embeddings, lm_head,
norms) stay dense, so a folder's ratio also depends on their share of the model.

`sizes` counts the pruned weights' bytes in every form from the tensors themselves: dense
(the run's dtype), bitmask + kept values, and CSR (values + column indices + row pointers)
with 64-bit indices (torch's) and with 16-bit column indices (any row of at most 65,536
columns) and 32-bit row pointers.

`save.format=quantized` (a run with quant=): the compressed-tensors library's pack-quantized
checkpoint, which transformers and vLLM load (`save_quantized`).

`size_of` is a run's results.json `size`: every form's bytes, the bits per parameter, and
after a structured cut the model's bytes before it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import SparsebenchError

BITMASK_FILE = "sparsebench_bitmask.safetensors"
FORMATS = ("dense", "bitmask", "quantized")


def pack(weight: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept values in row-major order, packed mask bits as uint8)."""
    keep = keep.to(torch.bool).reshape(-1).cpu()
    values = weight.detach().reshape(-1).cpu()[keep].contiguous()
    bits = torch.from_numpy(np.packbits(keep.numpy()))
    return values, bits


def unpack(values: torch.Tensor, bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The dense weight: zeros outside the mask, the kept values in row-major order inside."""
    n = int(np.prod(shape))
    keep = torch.from_numpy(np.unpackbits(bits.numpy(), count=n).astype(bool))
    out = torch.zeros(n, dtype=values.dtype)
    out[keep] = values
    return out.reshape(shape)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits) as a stream of `bits` bits each (numpy.packbits order)."""
    planes = np.unpackbits(q.to(torch.uint8).numpy()[:, None], axis=1)[:, 8 - bits :]
    return torch.from_numpy(np.packbits(planes.reshape(-1)))


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    planes = np.unpackbits(packed.numpy(), count=n * bits).reshape(n, bits)
    full = np.zeros((n, 8), dtype=np.uint8)
    full[:, 8 - bits :] = planes
    return torch.from_numpy(np.packbits(full, axis=1).reshape(-1))


def _quantized_values(value, keep, grid) -> dict[str, torch.Tensor]:
    """A quantized weight's kept values as b-bit codes, with its grid (scale, zero point per
    row and group of columns) to dequantize them: scale x (code - zero), the run's numbers."""
    scale, zero, bits, group = grid
    rows, cols = value.shape
    span = cols if group == -1 else group
    col_group = torch.arange(cols) // span
    s, z = scale.float()[:, col_group], zero.float()[:, col_group]  # per weight
    q = torch.clamp(torch.round(value.float() / s) + z, 0, 2**bits - 1)
    if not torch.equal((s * (q - z)).to(value.dtype), value):  # never silently another weight
        raise SparsebenchError("save.format=bitmask: a quantized weight is off its recorded grid")
    flat = keep.to(torch.bool).reshape(-1).cpu()
    return {
        "__codes": pack_codes(q.reshape(-1)[flat], bits),
        "__scale": scale.float().contiguous(),
        "__zero": zero.to(torch.uint8).contiguous(),
        "__grid": torch.tensor([bits, group], dtype=torch.int64),
        "__dtype": torch.empty(0, dtype=value.dtype),  # the run's dtype, for the dequantized
        "__bits": torch.from_numpy(np.packbits(flat.numpy())),
        "__shape": torch.tensor(value.shape, dtype=torch.int64),
    }


def _dequantized(raw, base: str) -> torch.Tensor:
    shape = tuple(int(d) for d in raw[f"{base}.__shape"].tolist())
    bits, group = (int(v) for v in raw[f"{base}.__grid"].tolist())
    n = int(np.prod(shape))
    keep = torch.from_numpy(np.unpackbits(raw[f"{base}.__bits"].numpy(), count=n).astype(bool))
    q = torch.zeros(n)
    q[keep] = unpack_codes(raw[f"{base}.__codes"], bits, int(keep.sum())).float()
    span = shape[1] if group == -1 else group
    col_group = torch.arange(shape[1]) // span
    s = raw[f"{base}.__scale"][:, col_group]
    z = raw[f"{base}.__zero"].float()[:, col_group]
    out = (s * (q.reshape(shape) - z)).to(raw[f"{base}.__dtype"].dtype)
    out[~keep.reshape(shape)] = 0  # a pruned weight: exactly zero (the code of 0 is the zero)
    return out


def bitmask_state(
    state: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    grids: dict[str, tuple] | None = None,
) -> dict[str, torch.Tensor]:
    """A state dict (the family's own layout) with every masked tensor as values + bits.

    `masks` are keyed by the state dict's own names and layout (families.original_masks:
    a fused projection's mask assembled from its parts, Conv1D's transposed, experts'
    stacked); every other tensor is stored dense. `grids` ({key: (scale, zero, bits,
    group_size)}, a quantized run's): those tensors' kept values are stored as b-bit codes
    with their grid instead of floats (`__codes`, `__scale`, `__zero`, `__grid`), and reload
    to the run's dequantized weights bit for bit."""
    out = {}
    seen: set[int] = set()
    for key, value in state.items():
        if value.data_ptr() in seen and value.numel():  # a tied weight (lm_head = embeddings): once
            continue
        seen.add(value.data_ptr())
        keep = masks.get(key)
        if keep is not None and grids and key in grids:
            out.update(
                {f"{key}.{k}": v for k, v in _quantized_values(value, keep, grids[key]).items()}
            )
        elif keep is not None:
            assert tuple(keep.shape) == tuple(value.shape), key
            values, bits = pack(value, keep)
            out[f"{key}.__values"] = values
            out[f"{key}.__bits"] = bits
            out[f"{key}.__shape"] = torch.tensor(value.shape, dtype=torch.int64)
        else:
            out[key] = value.contiguous()
    return out


def load_bitmask(path) -> dict[str, torch.Tensor]:
    """The dense state dict of a bitmask file, bit-identical to the one saved."""
    from safetensors.torch import load_file

    raw = load_file(str(path))
    out = {}
    for key, value in raw.items():
        if key.endswith(".__codes"):
            out[key.removesuffix(".__codes")] = _dequantized(raw, key.removesuffix(".__codes"))
        elif key.endswith((".__scale", ".__zero", ".__grid", ".__dtype")):
            continue
        elif key.endswith(".__values"):
            base = key.removesuffix(".__values")
            shape = tuple(int(d) for d in raw[f"{base}.__shape"].tolist())
            out[base] = unpack(value, raw[f"{base}.__bits"], shape)
        elif not key.endswith((".__bits", ".__shape")):
            out[key] = value
    return out


def load_into(model, folder, packed=None) -> None:
    """Load an export's weights into `model` (built from the export's config): the bitmask
    file's when `packed` names it, else the folder's safetensors; a linear stored at another
    shape (a width cut's block, cut/widths.py) is rebuilt at that shape first. Every
    parameter must come from the file (a tied weight is stored once)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from .cut.widths import reshape_to

    if packed is not None:
        state = load_bitmask(packed)
    else:
        state = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            if not file.name.startswith("sparsebench_"):
                state.update(load_file(str(file)))
    reshape_to(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()  # a tied weight is stored once
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in params if k not in missing}
    if unexpected or any(params[k].data_ptr() not in loaded for k in missing if k in params):
        raise SparsebenchError(
            f"{packed or folder} does not match the model's weights "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def load_bitmask_masks(path) -> dict[str, torch.Tensor]:
    """The keep masks a bitmask file holds (its bits; the values are not read), by the state
    dict's names and layout."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.endswith(".__bits"):
                base = key.removesuffix(".__bits")
                shape = tuple(int(d) for d in f.get_tensor(f"{base}.__shape").tolist())
                n = int(np.prod(shape))
                bits = np.unpackbits(f.get_tensor(key).numpy(), count=n).astype(bool)
                out[base] = torch.from_numpy(bits).reshape(shape)
    return out


def sizes(weights: dict[str, torch.Tensor], dtype_bytes: int) -> dict[str, int]:
    """Bytes of the pruned weights in each form (see the module's docstring)."""
    numel = nonzero = rows = bits = 0
    for w in weights.values():
        numel += w.numel()
        nonzero += int((w != 0).sum())
        rows += w.shape[0]
        bits += (w.numel() + 7) // 8
    return {
        "weights": numel,
        "nonzero": nonzero,
        "dense": numel * dtype_bytes,
        "bitmask": nonzero * dtype_bytes + bits,
        "csr_int64": nonzero * (dtype_bytes + 8) + (rows + len(weights)) * 8,
        "csr_int16": nonzero * (dtype_bytes + 2) + (rows + len(weights)) * 4,
    }


def save_quantized(model, quant, folder) -> None:
    """The quantized run in compressed-tensors' pack-quantized format (the library writes it):
    every pruned linear's integer codes packed into int32 with its float32 scales (and, on an
    asymmetric grid, zero points) per row and group; a pruned weight is stored as the code of 0.
    The codes are sparsebench's shifted into the library's signed range (code - 2^(b-1), and the
    zero point likewise), so scale x (code - zero) is the same number on both sides: the export
    dequantizes to the run's weights bit for bit. Written from a copy of the model."""
    import copy

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    from .models import prunable_linears

    linears = prunable_linears(model)
    missing = [n for n, lin in linears.items() if lin not in quant.grids]
    if missing:
        raise SparsebenchError(
            f"save.format=quantized: no grid recorded for {missing[0]} "
            f"({len(missing)} linears); the run's quantizer kept none"
        )
    args = QuantizationArgs(
        num_bits=quant.bits,
        type="int",
        symmetric=quant.sym,
        strategy="channel" if quant.group_size == -1 else "group",
        group_size=None if quant.group_size == -1 else quant.group_size,
        scale_dtype=torch.float32,
    )
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=sorted(linears), weights=args)},
        quantization_status="frozen",
        format="pack-quantized",
    )
    twin = copy.deepcopy(model).cpu()
    apply_quantization_config(twin, config)
    half = 2 ** (quant.bits - 1)
    for name, lin in prunable_linears(twin).items():
        scale, zero = quant.grids[linears[name]]
        lin.weight_scale.data.copy_(scale.reshape(lin.weight_scale.shape))
        if not quant.sym:
            lin.weight_zero_point.data.copy_((zero - half).reshape(lin.weight_zero_point.shape))
    compressor = ModelCompressor(quantization_config=config)
    compressor.compress_model(twin)
    twin.save_pretrained(folder, safe_serialization=True)
    compressor.update_config(folder)


def size_of(model, masks=None, quant=None, removed: int = 0) -> dict[str, Any]:
    """Bytes of the pruned weights in each stored form, and of the whole model dense and with
    the pruned weights as bitmask + values (formats.py); the bits per parameter a stored
    model needs, with its masks and its quantization if any (quant.bits_of; results.json
    `size`); after a structured cut of `removed` weights, the model before it too."""
    from .evaluation.speed import weight_bytes
    from .lowrank import lowrank_params
    from .models import prunable_linears
    from .quant import bits_of

    linears = prunable_linears(model)
    dtype_bytes = next(iter(linears.values())).weight.element_size()
    pruned = sizes({n: lin.weight.detach() for n, lin in linears.items()}, dtype_bytes)
    # a sparse + low-rank linear's factors (OATS) are stored dense beside its sparse weight;
    # the dense model they are compared with holds S + U V in one weight
    factors = [p for lin in linears.values() for p in lowrank_params(lin)]
    factor_bytes = sum(p.numel() * p.element_size() for p in factors)
    whole = weight_bytes(model) - factor_bytes
    rest = whole - pruned["dense"]
    in_linears = {id(lin.weight) for lin in linears.values()} | {id(p) for p in factors}
    rest_params = sum(p.numel() for p in model.parameters() if id(p) not in in_linears)
    bitmask = rest + pruned["bitmask"] + factor_bytes
    return {
        "pruned_weights": pruned,
        **({"lowrank_factors": factor_bytes} if factors else {}),
        "model_dense": whole,
        "model_bitmask": bitmask,
        "model_csr_int16": rest + pruned["csr_int16"] + factor_bytes,
        "bitmask_over_dense": round(bitmask / whole, 4),
        "bits": bits_of(linears, masks, quant, rest_params, rest * 8),
        **(
            {
                "model_before_cut": whole + removed * dtype_bytes,
                "cut_over_dense": round(whole / (whole + removed * dtype_bytes), 4),
            }
            if removed
            else {}
        ),
    }
