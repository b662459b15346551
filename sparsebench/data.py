"""Calibration windows and evaluation token streams, from the hub or a local data root.

Protocol (docs/methods.md): WikiText-2 raw test rows joined with "\\n\\n"; C4 eval = the
first 1100 documents of the validation shard joined with " " and cut to 256 x seqlen
tokens; calibration = `nsamples` random seqlen windows of random C4 train documents
longer than seqlen, drawn exactly as the official SparseGPT/Wanda loader draws them.

Offline (source=local), from the data root (see SOURCES.md there):
  wikitext-2-raw-v1/wiki.test.raw   rows are the file's lines read in text mode
                                     (the convention of the stated CPU fixed points)
  c4/c4_validation_2k.parquet       docs [0, 1100) = C4 eval, [1100, 2000) = calibration

Tokenized results are cached on disk, keyed by what determines them: the content
digest of the file they came from (never its path: a file edited in place is read
again), the tokenizer, seqlen and the draw. A cache entry that cannot be read is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SparsebenchError
from .registry import option

log = logging.getLogger(__name__)

SOURCES = ("local", "hub")
EVAL_SETS = ("wikitext2", "c4")
CALIB_SETS = ("c4", "wikitext2")
C4_EVAL_DOCS = 1100  # first 1100 validation documents (official C4 eval)
C4_EVAL_WINDOWS = 256  # the official loader keeps 256 x seqlen tokens
WIKI_FILE = "wikitext-2-raw-v1/wiki.{split}.raw"
C4_FILE = "c4/c4_validation_2k.parquet"
C4_HUB_TRAIN = "en/c4-train.00000-of-01024.json.gz"
C4_HUB_VAL = "en/c4-validation.00000-of-00008.json.gz"


@dataclass
class DataSpec:
    source: str = "local"
    root: str | None = None  # local data root; None: $SPARSEBENCH_DATA_ROOT or ../shared/data
    calib_set: str = option("c4", choices=CALIB_SETS)
    nsamples: int = option(128, ge=1)
    seed: int = 0
    calib_docs: tuple[int, int] = option(
        (1100, 2000), ge=0
    )  # local C4 documents that stand in for the train shard
    cache: bool = True
    needs_files: bool = True  # False for a random-weight model (random ids): the root may be absent

    def __post_init__(self):
        if self.source not in SOURCES:
            raise SparsebenchError(
                f"unknown data.source '{self.source}'; valid: {', '.join(SOURCES)}"
            )
        if self.calib_set not in CALIB_SETS:
            raise SparsebenchError(
                f"unknown calibration set '{self.calib_set}'; valid: {', '.join(CALIB_SETS)}"
            )
        if not isinstance(self.nsamples, int) or self.nsamples < 1:
            raise SparsebenchError(
                f"data.nsamples must be a positive integer, got {self.nsamples!r}"
            )
        self.calib_docs = tuple(self.calib_docs)
        if self.source == "local" and self.needs_files:
            self.root = str(resolve_root(self.root))


def resolve_root(root: str | None) -> Path:
    """Explicit root > $SPARSEBENCH_DATA_ROOT > ../shared/data beside the repo or the cwd."""
    candidates = [root] if root else []
    if not root and os.environ.get("SPARSEBENCH_DATA_ROOT"):
        candidates = [os.environ["SPARSEBENCH_DATA_ROOT"]]
    if not candidates:
        repo = Path(__file__).resolve().parent.parent
        candidates = [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for c in candidates:
        if Path(c).expanduser().is_dir():
            return Path(c).expanduser().resolve()
    raise SparsebenchError(
        f"data root not found (tried {', '.join(str(c) for c in candidates)}); "
        f"set data.root=<folder> or SPARSEBENCH_DATA_ROOT, or use data=hub"
    )


def _local_file(spec: DataSpec, rel: str) -> Path:
    path = Path(spec.root) / rel
    if not path.is_file():
        raise SparsebenchError(f"data file {path} is missing (data.root={spec.root})")
    return path


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file's content (memoised per path, size and mtime in this process)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _read_parquet_texts(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["text"])
    except (pa.ArrowException, OSError, KeyError) as err:
        raise SparsebenchError(
            f"data file {path} is not a readable parquet file with a 'text' column "
            f"({str(err).splitlines()[0][:200]}); restore it from its source (SOURCES.md)"
        ) from None
    return table.column("text").to_pylist()


def check_file(spec: DataSpec, rel: str) -> str:
    """Check a local data file now (present, non-empty, readable, enough documents), before
    any model loads; returns its content digest."""
    path = _local_file(spec, rel)
    if path.stat().st_size == 0:
        raise SparsebenchError(
            f"data file {path} is empty; restore it from its source (SOURCES.md in data.root)"
        )
    if rel.endswith(".parquet"):
        n = len(_read_parquet_texts(path))
        need = max(C4_EVAL_DOCS, spec.calib_docs[1])
        if n < need:
            raise SparsebenchError(
                f"data file {path} has {n} documents; sparsebench reads documents [0, {need})"
            )
    else:
        with open(path, encoding="utf-8", errors="strict") as f:
            try:
                if not f.read().strip():
                    raise SparsebenchError(
                        f"data file {path} holds only white space; restore it from its source"
                    )
            except UnicodeDecodeError as err:
                raise SparsebenchError(
                    f"data file {path} is not UTF-8 text ({err.reason} at byte {err.start})"
                ) from None
    return file_digest(path)


# ----------------------------------------------------------------------------- raw text


def wikitext_rows(spec: DataSpec, split: str = "test") -> list[str]:
    if spec.source == "hub":
        from datasets import load_dataset

        return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
    local = {"test": "test", "validation": "valid"}
    if split not in local:
        raise SparsebenchError(
            f"WikiText-2 split '{split}' is not in the local data (have: test, validation)"
        )
    # Text mode turns the file's CRLF into "\n"; each row keeps its newline.
    with open(_local_file(spec, WIKI_FILE.format(split=local[split])), encoding="utf-8") as f:
        return f.readlines()


def c4_documents(spec: DataSpec, split: str) -> list[str]:
    """split='validation': the eval documents; split='train': the calibration pool."""
    if spec.source == "hub":
        from datasets import load_dataset

        file = C4_HUB_VAL if split == "validation" else C4_HUB_TRAIN
        docs = load_dataset("allenai/c4", data_files={split: file}, split=split)["text"]
        return list(docs[:C4_EVAL_DOCS]) if split == "validation" else list(docs)
    texts = _read_parquet_texts(_local_file(spec, C4_FILE))
    lo, hi = (0, C4_EVAL_DOCS) if split == "validation" else spec.calib_docs
    if hi > len(texts) or lo >= hi:
        raise SparsebenchError(
            f"C4 document range [{lo}, {hi}) is outside the {len(texts)} local documents"
        )
    return texts[lo:hi]


# ----------------------------------------------------------------------------- caching


def tokenizer_id(tok) -> str:
    probe = "Sparsebench probe: 12345 naïve café\n\n  end."
    return f"{getattr(tok, 'name_or_path', '')}|{len(tok)}|{tok(probe)['input_ids']}"


def _cached(key: str, build):
    from .models import cache_root

    path = cache_root() / "data" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".pt")
    if path.exists():
        try:
            value = torch.load(path)
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.numel() > 0:
                return value
            raise ValueError(f"holds {type(value).__name__}, not a token tensor")
        except Exception as err:  # truncated, corrupt or foreign: rebuild it, once
            log.warning(
                "cache entry %s is unreadable (%s); rebuilding it",
                path,
                str(err).splitlines()[0][:120],
            )
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(value, tmp)
    tmp.replace(path)
    return value


def _source_key(spec: DataSpec, rel: str) -> str:
    """What the tokens of one source file depend on: its content (local), or the hub name."""
    if spec.source == "hub":
        return f"hub|{rel}"
    return f"local|{file_digest(_local_file(spec, rel))}"


# ----------------------------------------------------------------------------- public


def eval_stream(spec: DataSpec, name: str, tok, seqlen: int) -> torch.Tensor:
    """The token stream (1, T) of an eval set; callers cut it into seqlen windows."""
    if name not in EVAL_SETS:
        raise SparsebenchError(f"unknown eval dataset '{name}'; valid: {', '.join(EVAL_SETS)}")

    def build():
        if name == "wikitext2":
            return tok("\n\n".join(wikitext_rows(spec, "test")), return_tensors="pt").input_ids
        ids = tok(" ".join(c4_documents(spec, "validation")), return_tensors="pt").input_ids
        return ids[:, : C4_EVAL_WINDOWS * seqlen]

    source = _source_key(spec, eval_file(name))
    key = f"eval|{name}|{source}|{tokenizer_id(tok)}|{seqlen if name == 'c4' else ''}"
    return _cached(key, build) if spec.cache else build()


class WindowSampler:
    """Random seqlen windows of random documents longer than seqlen, the official way.

    The official C4 loader seeds Python's `random` and, per sample, draws document
    indices until one tokenizes to more than seqlen tokens, then a window start in
    [0, n - seqlen - 1]. A private random.Random(seed) gives the same sequence without
    touching global state; tokenized documents are memoised for long training runs.
    """

    def __init__(self, docs: list[str], tok, seqlen: int, seed: int):
        self.docs, self.tok, self.seqlen = docs, tok, seqlen
        self.rng = random.Random(seed)
        self._ids: dict[int, torch.Tensor] = {}

    def _tokens(self, i: int) -> torch.Tensor:
        if i not in self._ids:
            self._ids[i] = self.tok(self.docs[i], return_tensors="pt").input_ids[0]
        return self._ids[i]

    def draw(self) -> torch.Tensor:
        for _attempt in range(10_000):
            ids = self._tokens(self.rng.randint(0, len(self.docs) - 1))
            if ids.shape[0] > self.seqlen:
                break
        else:
            raise SparsebenchError(
                f"no calibration document is longer than seqlen={self.seqlen} tokens; lower "
                "model.seqlen"
            )
        start = self.rng.randint(0, ids.shape[0] - self.seqlen - 1)
        return ids[start : start + self.seqlen]

    def batch(self, n: int) -> torch.Tensor:
        return torch.stack([self.draw() for _ in range(n)])


class RandomWindows:
    """Random token ids of a vocabulary: the windows of a random-weight model (source=random),
    which has no tokenizer and whose quality is never measured."""

    def __init__(self, vocab_size: int, seqlen: int, seed: int):
        self.vocab, self.seqlen = vocab_size, seqlen
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, n: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (n, self.seqlen), generator=self.gen)


def window_source(spec: DataSpec, tok, seqlen: int, seed: int, vocab_size: int | None = None):
    """Fresh training windows: the calibration pool drawn the official way, or random ids
    for a model without a tokenizer (source=random)."""
    if tok is None:
        return RandomWindows(vocab_size, seqlen, seed)
    return WindowSampler(calibration_documents(spec), tok, seqlen, seed)


def sample_windows(docs: list[str], tok, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) windows: the official calibration draw."""
    return WindowSampler(docs, tok, seqlen, seed).batch(nsamples)


def calibration_documents(spec: DataSpec) -> list[str]:
    """The calibration pool: C4 train documents, or WikiText-2 as one long document."""
    if spec.calib_set == "c4":
        return c4_documents(spec, "train")
    # train split on the hub; offline there is no train file, so validation
    split = "train" if spec.source == "hub" else "validation"
    return ["\n\n".join(wikitext_rows(spec, split))]


def calibration_file(spec: DataSpec) -> str:
    """The local file the calibration pool comes from (relative to the data root)."""
    return C4_FILE if spec.calib_set == "c4" else WIKI_FILE.format(split="valid")


def eval_file(name: str) -> str:
    return WIKI_FILE.format(split="test") if name == "wikitext2" else C4_FILE


def calibration(spec: DataSpec, tok, seqlen: int, vocab_size: int | None = None) -> torch.Tensor:
    """(nsamples, seqlen) token windows for calibration (random ids without a tokenizer)."""
    if tok is None:
        return RandomWindows(vocab_size, seqlen, spec.seed).batch(spec.nsamples)

    def build():
        return sample_windows(calibration_documents(spec), tok, spec.nsamples, seqlen, spec.seed)

    key = (
        f"calib|{spec.calib_set}|{_source_key(spec, calibration_file(spec))}|{spec.calib_docs}|"
        f"{tokenizer_id(tok)}|{seqlen}|{spec.nsamples}|{spec.seed}"
    )
    return _cached(key, build) if spec.cache else build()


def calibration_windows(
    spec: DataSpec, tok, seqlen: int, vocab_size: int | None, nsamples: int | None = None
):
    """The run's calibration draw with `nsamples` windows (None: the run's data.nsamples): the
    windows a warm start (Elsa) or a reconstruction reads beside the run's own."""
    if nsamples is not None and nsamples != spec.nsamples:
        spec = DataSpec(**{**spec.__dict__, "nsamples": nsamples})
    return calibration(spec, tok, seqlen, vocab_size)
