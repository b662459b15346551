"""Zero-shot accuracy with lm-evaluation-harness on the in-memory (pruned) model.

With data from the hub the stock lm-eval tasks run as they are. Offline, the tasks
below read the files of the data root (zeroshot/, see SOURCES.md there) with the
stock tasks' prompts, choices and metrics; only the loading differs. They are
written as lm-eval YAML task files into the cache and registered under
`<task>_local`; results are reported under the stock names with source "local".

  boolq        SuperGLUE val; labels "true"/"false" -> 1/0
  rte          SuperGLUE val (= GLUE validation); entailment -> 0 (choice "True")
  winogrande   llm-foundry layout: context_options / continuation / gold, which are
               exactly the stock partial-scoring contexts and target
  arc_easy     original ARC-V1 test jsonl -> the HF layout (question, choices, answerKey)
  arc_challenge
  openbookqa   llm-foundry copy of the 500 test questions (same stems and keys as test.tsv)
HellaSwag offline has 4 items only: it runs from the hub (data=hub) or not at all.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SparsebenchError
from ..registry import option

log = logging.getLogger(__name__)

STOCK_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
HEADLINES = ("acc", "acc_norm")


# ----------------------------------------------------------------------------- doc processing
# Each turns one record of the local file into the record the stock task expects.


def boolq_doc(doc: dict) -> dict:
    label = doc["label"]
    if isinstance(label, str):
        label = {"true": 1, "false": 0}[label.lower()]
    return {"question": doc["question"], "passage": doc["passage"], "label": int(label)}


def rte_doc(doc: dict) -> dict:
    label = doc["label"]
    if isinstance(label, str):
        label = {"entailment": 0, "not_entailment": 1}[label]
    return {"sentence1": doc["premise"], "sentence2": doc["hypothesis"], "label": int(label)}


def arc_doc(doc: dict) -> dict:
    q = doc["question"]
    return {
        "question": q["stem"],
        "choices": {
            "text": [c["text"] for c in q["choices"]],
            "label": [c["label"] for c in q["choices"]],
        },
        "answerKey": doc["answerKey"],
    }


def openbookqa_doc(doc: dict) -> dict:
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {
        "question_stem": doc["query"],
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[int(doc["gold"])],
    }


def _mapper(fn):
    def process(dataset):
        return dataset.map(fn, remove_columns=dataset.column_names)

    return process


process_boolq = _mapper(boolq_doc)
process_rte = _mapper(rte_doc)
process_arc = _mapper(arc_doc)
process_openbookqa = _mapper(openbookqa_doc)


def winogrande_gold(doc: dict) -> int:
    return int(doc["gold"])


def winogrande_contexts(doc: dict) -> list[str]:
    return list(doc["context_options"])


def winogrande_target(doc: dict) -> str:
    return doc["continuation"].strip()


# ----------------------------------------------------------------------------- task files

ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
ARC = {
    "version": 1.0,
    "output_type": "multiple_choice",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
    "process_docs": "!function sb_utils.process_arc",
    "metric_list": [ACC, ACC_NORM],
}
OFFLINE: dict[str, dict[str, Any]] = {
    "boolq": {
        "version": 2.0,  # the stock task's version this definition mirrors
        "file": "boolq/val.jsonl",
        "output_type": "multiple_choice",
        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": ["no", "yes"],
        "process_docs": "!function sb_utils.process_boolq",
        "metric_list": [ACC],
    },
    "rte": {
        "version": 1.0,  # the stock task's version this definition mirrors
        "file": "rte/val.jsonl",
        "output_type": "multiple_choice",
        "doc_to_text": "{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": ["True", "False"],
        "process_docs": "!function sb_utils.process_rte",
        "metric_list": [ACC],
    },
    "winogrande": {
        "version": 1.0,  # the stock task's version this definition mirrors
        "file": "winogrande/llmfoundry_winogrande.jsonl",
        "output_type": "multiple_choice",
        "doc_to_text": "!function sb_utils.winogrande_gold",
        "doc_to_target": "!function sb_utils.winogrande_target",
        "doc_to_choice": "!function sb_utils.winogrande_contexts",
        "metric_list": [ACC],
    },
    "arc_easy": {"file": "arc_easy/ARC-Easy-Test.jsonl", **ARC},
    "arc_challenge": {"file": "arc_challenge/ARC-Challenge-Test.jsonl", **ARC},
    "openbookqa": {
        "version": 1.0,  # the stock task's version this definition mirrors
        "file": "openbookqa/llmfoundry_openbook_qa.jsonl",
        "output_type": "multiple_choice",
        "doc_to_text": "question_stem",
        "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
        "doc_to_choice": "{{choices.text}}",
        "process_docs": "!function sb_utils.process_openbookqa",
        "metric_list": [ACC, ACC_NORM],
    },
}


def _yaml_value(value: Any) -> str:
    if isinstance(value, str) and value.startswith("!function "):
        return value  # a YAML tag, unquoted
    return json.dumps(value)  # JSON is valid YAML and quotes every string safely


def write_offline_tasks(data_root: Path, dest: Path) -> Path:
    """lm-eval task YAMLs (and their helper module) that read the local files."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "sb_utils.py").write_text(
        "from sparsebench.evaluation.zeroshot import *  # noqa: F401,F403\n"
    )
    for name, spec in OFFLINE.items():
        path = Path(data_root) / "zeroshot" / spec["file"]
        fields = {k: v for k, v in spec.items() if k not in ("file", "version")}
        lines = [
            f"task: {name}_local",
            "dataset_path: json",
            f"dataset_kwargs: {json.dumps({'data_files': {'test': str(path)}})}",
            "test_split: test",
            *(f"{k}: {_yaml_value(v)}" for k, v in fields.items()),
            f"metadata: {{version: {spec['version']}, source: sparsebench-offline}}",
        ]
        (dest / f"{name}_local.yaml").write_text("\n".join(lines) + "\n")
    return dest


# ----------------------------------------------------------------------------- running


@dataclass
class ZeroShotSpec:
    tasks: tuple[str, ...] = ()
    limit: int | None = option(None, ge=1)  # documents per task (quick runs); None: all
    batch_size: int = option(8, ge=1)
    num_fewshot: int = option(0, ge=0)
    headline: str = "acc"  # acc | acc_norm (tasks without acc_norm report acc)

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        for t in self.tasks:
            if t not in STOCK_TASKS:
                from ..registry import did_you_mean

                raise SparsebenchError(
                    f"unknown zero-shot task '{t}'{did_you_mean(t, list(STOCK_TASKS))}; valid: "
                    f"{', '.join(STOCK_TASKS)}"
                )
        if self.headline not in HEADLINES:
            raise SparsebenchError(
                f"unknown eval.zeroshot.headline '{self.headline}'; valid: {', '.join(HEADLINES)}"
            )
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise SparsebenchError(
                f"eval.zeroshot.limit must be null or a positive integer, got {self.limit!r}"
            )

    def local_files(self) -> list[str]:
        """The offline files these tasks read, relative to the data root."""
        return [f"zeroshot/{OFFLINE[t]['file']}" for t in self.tasks if t in OFFLINE]

    def check_source(self, source: str, data_root: str | None) -> None:
        if source == "local":
            if "hellaswag" in self.tasks:
                raise SparsebenchError(
                    "hellaswag has only 4 offline items; run it with data=hub or drop it from "
                    "eval.zeroshot.tasks"
                )
            for t in self.tasks:
                path = Path(data_root) / "zeroshot" / OFFLINE[t]["file"]
                if not path.is_file():
                    raise SparsebenchError(
                        f"zero-shot file {path} is missing (data.root={data_root})"
                    )


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def evaluate_zeroshot(
    model, tokenizer, spec: ZeroShotSpec, source: str, data_root: str | None, device, cache: Path
) -> dict[str, Any]:
    """Runs lm-eval; returns {"tasks": {task: {acc, acc_norm?, stderr...}}, "mean_acc",
    versions}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SparsebenchError(
            "zero-shot needs lm-evaluation-harness: pip install 'lm-eval>=0.4,<0.5'"
        ) from None

    if source == "local":
        include = write_offline_tasks(Path(data_root), cache / "lm_eval_tasks")
        manager = TaskManager(include_path=str(include))
        names = {f"{t}_local": t for t in spec.tasks}
    else:
        manager = TaskManager()
        names = {t: t for t in spec.tasks}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size, device=str(device))
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(names),
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=1000,
    )
    tasks: dict[str, dict[str, float]] = {}
    for key, stock in names.items():
        res = out["results"][key]
        entry = {m: float(res[f"{m},none"]) for m in HEADLINES if f"{m},none" in res}
        # lm-eval reports "N/A" for a stderr it cannot estimate (e.g. one document)
        entry.update(
            {
                f"{m}_stderr": _number(res.get(f"{m}_stderr,none"))
                for m in HEADLINES
                if f"{m}_stderr,none" in res
            }
        )
        entry["headline"] = entry.get(spec.headline, entry["acc"])
        entry["n"] = int(out.get("n-samples", {}).get(key, {}).get("effective", 0))
        tasks[stock] = entry
    return {
        "tasks": tasks,
        "mean_acc": sum(t["headline"] for t in tasks.values()) / len(tasks),
        "headline": spec.headline,
        "source": source,
        "limit": spec.limit,
        "num_fewshot": spec.num_fewshot,
        "task_versions": {names[k]: v for k, v in out.get("versions", {}).items() if k in names},
        "harness_version": lm_eval.__version__,
    }
