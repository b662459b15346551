import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparsebench.errors import SparsebenchError
from sparsebench.evaluation.perplexity import EvalSpec, perplexity


class Uniform(nn.Module):
    """Predicts the uniform distribution over V tokens: perplexity exactly V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


class Oracle(nn.Module):
    """Puts probability p on the true next token of a known stream, the rest uniform."""

    def __init__(self, vocab, p):
        super().__init__()
        self.vocab, self.p = vocab, p

    def forward(self, input_ids, use_cache=False):
        nxt = (input_ids + 1) % self.vocab  # the stream counts up
        rest = (1 - self.p) / (self.vocab - 1)
        probs = torch.full((*input_ids.shape, self.vocab), rest)
        probs.scatter_(-1, nxt.unsqueeze(-1), self.p)
        return SimpleNamespace(logits=probs.log())


def test_uniform_model_perplexity_is_vocab():
    ids = torch.randint(0, 50, (1, 1000))
    ppl, windows = perplexity(Uniform(50), ids, 64, torch.device("cpu"))
    assert windows == 15 and ppl == pytest.approx(50.0, rel=1e-5)


def test_oracle_perplexity_known_answer():
    ids = (torch.arange(640) % 10).unsqueeze(0)
    ppl, _ = perplexity(Oracle(10, 0.5), ids, 64, torch.device("cpu"))
    assert ppl == pytest.approx(2.0, rel=1e-5)


def test_batching_and_max_windows():
    ids = (torch.arange(1000) % 7).unsqueeze(0)
    model = Oracle(7, 0.9)
    a, _ = perplexity(model, ids, 50, torch.device("cpu"), batch_size=1)
    b, _ = perplexity(model, ids, 50, torch.device("cpu"), batch_size=6)
    assert a == pytest.approx(b, rel=1e-6)
    assert perplexity(model, ids, 50, torch.device("cpu"), max_windows=3)[1] == 3


def test_nan_loss_is_an_error():
    class Broken(Uniform):
        def forward(self, input_ids, use_cache=False):
            return SimpleNamespace(logits=torch.full((*input_ids.shape, self.vocab), math.nan))

    with pytest.raises(SparsebenchError, match="NaN"):
        perplexity(Broken(5), torch.zeros(1, 20, dtype=torch.long), 10, torch.device("cpu"))


def test_too_short_stream():
    with pytest.raises(SparsebenchError, match="fewer than one window"):
        perplexity(Uniform(5), torch.zeros(1, 5, dtype=torch.long), 10, torch.device("cpu"))


def test_eval_spec_validation():
    with pytest.raises(SparsebenchError, match="valid: wikitext2, c4"):
        EvalSpec(datasets=["ptb"])
    with pytest.raises(SparsebenchError, match="max_windows"):
        EvalSpec(max_windows=0)
