import random

import pytest
import torch

from sparsebench import data as datamod
from sparsebench.data import DataSpec, calibration, eval_stream, sample_windows, wikitext_rows
from sparsebench.errors import SparsebenchError
from sparsebench.models import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_byte_tokenizer_roundtrip(tok):
    text = "Héllo, wörld!\n\n = Title = \n"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode()) and max(ids) < 256
    assert tok.decode(ids) == text


def test_wikitext_rows_text_mode():
    rows = wikitext_rows(DataSpec(), "test")
    assert len(rows) == 4358  # the HF dataset's num_examples
    assert rows[0] == " \n" and rows[1] == " = Robert Boulter = \n"
    assert not any("\r" in r for r in rows)


def test_sample_windows_follows_official_draw(tok):
    docs = ["a" * 10, "b" * 100, "c" * 5, "d" * 300]
    w = sample_windows(docs, tok, nsamples=6, seqlen=32, seed=3)
    assert w.shape == (6, 32)
    # replay the official loop with the same seed
    random.seed(3)
    for row in w:
        while True:
            i = random.randint(0, len(docs) - 1)
            if len(docs[i]) > 32:
                break
        start = random.randint(0, len(docs[i]) - 32 - 1)
        assert tok.decode(row.tolist()) == docs[i][start : start + 32]
    assert torch.equal(w, sample_windows(docs, tok, 6, 32, seed=3))
    assert not torch.equal(w, sample_windows(docs, tok, 6, 32, seed=4))


def test_sample_windows_too_short(tok):
    with pytest.raises(SparsebenchError, match="longer than seqlen"):
        sample_windows(["short"], tok, 1, 64, 0)


def test_calibration_uses_docs_1100_to_2000_and_caches(tok, monkeypatch):
    spec = DataSpec(nsamples=4, seed=0)
    a = calibration(spec, tok, 128)
    assert a.shape == (4, 128)
    pool = datamod.c4_documents(spec, "train")
    assert len(pool) == 900
    assert any(tok.decode(a[0].tolist()) in d for d in pool)
    monkeypatch.setattr(datamod, "sample_windows", lambda *a, **k: pytest.fail("cache miss"))
    assert torch.equal(calibration(spec, tok, 128), a)


def test_eval_streams(tok):
    spec = DataSpec()
    c4 = eval_stream(spec, "c4", tok, 64)
    assert c4.shape == (1, 256 * 64)  # cut to 256 windows
    wiki = eval_stream(spec, "wikitext2", tok, 64)
    assert wiki.shape[1] > 1_000_000  # the whole test split, ~1.29 MB of bytes
    head = " \n" + "\n\n" + " = Robert Boulter = \n" + "\n\n" + " \n"  # rows joined with "\n\n"
    assert tok.decode(wiki[0, : len(head)].tolist()) == head


def test_missing_root_and_file(tmp_path, monkeypatch):
    with pytest.raises(SparsebenchError, match="data root not found"):
        DataSpec(root=str(tmp_path / "nope"))
    spec = DataSpec(root=str(tmp_path))
    with pytest.raises(SparsebenchError, match="wiki.test.raw is missing"):
        wikitext_rows(spec, "test")
    monkeypatch.setenv("SPARSEBENCH_DATA_ROOT", str(tmp_path))
    assert DataSpec().root == str(tmp_path.resolve())


def test_bad_data_options():
    with pytest.raises(SparsebenchError, match="valid: local, hub"):
        DataSpec(source="s3")
    with pytest.raises(SparsebenchError, match="positive integer"):
        DataSpec(nsamples=0)
