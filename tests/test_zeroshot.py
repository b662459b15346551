"""Offline zero-shot tasks: parsed from hand-made files, prompted and scored like the stock
tasks."""

import json

import pytest

pytest.importorskip("lm_eval")
from lm_eval.api.model import LM  # noqa: E402

from sparsebench.errors import SparsebenchError  # noqa: E402
from sparsebench.evaluation.zeroshot import ZeroShotSpec, evaluate_zeroshot  # noqa: E402


class ShortestAnswer(LM):
    """Log-likelihood = -len(continuation): always picks the shortest choice. Records prompts."""

    def __init__(self):
        super().__init__()
        self.requests = []

    def loglikelihood(self, requests):
        out = []
        for r in requests:
            context, continuation = r.args
            self.requests.append((context, continuation))
            out.append((-float(len(continuation)), False))
        return out

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        raise NotImplementedError


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def root(tmp_path):
    z = tmp_path / "zeroshot"
    _jsonl(
        z / "boolq/val.jsonl",
        [
            {
                "question": "is it red",
                "passage": "P1",
                "idx": 0,
                "label": "false",
            },  # shortest " no" -> right
            {"question": "is it blue", "passage": "P2", "idx": 1, "label": "true"},  # wrong
            {"question": "is it green", "passage": "P3", "idx": 2, "label": "false"},  # right
        ],
    )
    _jsonl(
        z / "rte/val.jsonl",
        [
            {
                "premise": "A",
                "hypothesis": "B",
                "label": "entailment",
                "idx": 0,
            },  # " True" (5) < " False" -> right
            {"premise": "C", "hypothesis": "D", "label": "not_entailment", "idx": 1},  # wrong
        ],
    )
    arc = [
        {
            "id": "q1",
            "question": {
                "stem": "What?",
                "choices": [{"text": "long answer", "label": "A"}, {"text": "ab", "label": "B"}],
            },
            "answerKey": "B",
        },
        {
            "id": "q2",
            "question": {
                "stem": "Why?",
                "choices": [
                    {"text": "x", "label": "1"},
                    {"text": "yyy", "label": "2"},
                    {"text": "zz", "label": "3"},
                ],
            },
            "answerKey": "3",
        },
    ]
    _jsonl(z / "arc_easy/ARC-Easy-Test.jsonl", arc)
    _jsonl(z / "arc_challenge/ARC-Challenge-Test.jsonl", arc[:1])
    _jsonl(
        z / "openbookqa/llmfoundry_openbook_qa.jsonl",
        [
            {
                "query": "Fog is around:",
                "choices": ["a marsh", "a tundra", "sea", "a desert"],
                "gold": 2,
            },
            {"query": "Sun is a:", "choices": ["star", "planet", "moon", "comet"], "gold": 1},
        ],
    )
    _jsonl(
        z / "winogrande/llmfoundry_winogrande.jsonl",
        [
            {
                "context_options": ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"],
                "continuation": "won.",
                "gold": 0,
            },
        ],
    )
    return tmp_path


@pytest.mark.e2e  # long end to end: make test-e2e
def test_offline_tasks_prompt_and_score_like_stock(root, tmp_path, monkeypatch):
    import lm_eval.models.huggingface as hf

    lm = ShortestAnswer()
    monkeypatch.setattr(hf, "HFLM", lambda **kw: lm)
    spec = ZeroShotSpec(
        tasks=("boolq", "rte", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
    )
    out = evaluate_zeroshot(None, None, spec, "local", str(root), "cpu", tmp_path / "cache")
    acc = {t: v["acc"] for t, v in out["tasks"].items()}
    assert acc["boolq"] == pytest.approx(2 / 3)
    assert acc["rte"] == pytest.approx(0.5)
    assert acc["arc_easy"] == pytest.approx(0.5)  # q1 right ("ab"), q2 wrong (picks "x")
    assert acc["arc_challenge"] == 1.0
    assert acc["openbookqa"] == pytest.approx(0.5)  # "sea" right, "moon" != gold "planet"
    assert "acc_norm" in out["tasks"]["arc_easy"] and "acc_norm" not in out["tasks"]["boolq"]
    assert out["mean_acc"] == pytest.approx(sum(acc.values()) / 6)
    assert out["harness_version"] and out["task_versions"]["boolq"] == 2.0
    prompts = set(lm.requests)
    assert ("P1\nQuestion: is it red?\nAnswer:", " no") in prompts and (
        "P1\nQuestion: is it red?\nAnswer:",
        " yes",
    ) in prompts
    assert ("A\nQuestion: B True or False?\nAnswer:", " True") in prompts
    assert ("Question: What?\nAnswer:", " long answer") in prompts
    assert ("Fog is around:", " a marsh") in prompts
    # WinoGrande: partial scoring, the two filled-in prefixes as contexts, one continuation
    assert ("Sarah beat Maria so Sarah", " won.") in prompts and (
        "Sarah beat Maria so Maria",
        " won.",
    ) in prompts


def test_zero_shot_spec_errors(root):
    with pytest.raises(
        SparsebenchError, match="unknown zero-shot task 'arc_esay' \\(did you mean 'arc_easy'\\?\\)"
    ):
        ZeroShotSpec(tasks=("arc_esay",))
    with pytest.raises(SparsebenchError, match="hellaswag has only 4 offline items"):
        ZeroShotSpec(tasks=("hellaswag",)).check_source("local", str(root))
    with pytest.raises(SparsebenchError, match="zero-shot file .*boolq/val.jsonl is missing"):
        ZeroShotSpec(tasks=("boolq",)).check_source("local", str(root / "nope"))
    with pytest.raises(SparsebenchError, match="headline"):
        ZeroShotSpec(headline="f1")
