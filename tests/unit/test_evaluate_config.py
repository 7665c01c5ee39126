"""params.yaml `evaluate`: custom tasks, Hub task names and their validation (no model, no mteb)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gist_core.config import CustomClassificationTask, CustomRetrievalTask, CustomSTSTask, settings_from_dict
from gist_core.errors import ConfigError

CUSTOM = [
    {
        "name": "MyIntentClassification",
        "type": "Classification",
        "train": "data/intents/train.csv",
        "test": "data/intents/test.csv",
        "text_column": "utterance",
        "label_column": "intent",
        "format": "csv",
    },
    {"name": "MySTS", "type": "STS", "test": "data/my_sts/test.jsonl"},
    {
        "name": "MyRetrieval",
        "type": "Retrieval",
        "corpus": "data/my_ret/corpus.jsonl",
        "queries": "data/my_ret/queries.jsonl",
        "qrels": "data/my_ret/qrels/test.tsv",
    },
]


def _raw(repo_root: Path, **evaluate) -> dict:
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["evaluate"].update(evaluate)
    raw["gate"]["required_tasks"] = []
    return raw


def test_custom_tasks_are_typed_by_their_type(repo_root: Path, tmp_path: Path) -> None:
    settings = settings_from_dict(
        _raw(repo_root, custom_tasks=CUSTOM, tasks=["STSBenchmark", "MyIntentClassification", "MySTS", "MyRetrieval"]),
        tmp_path,
    )
    intent, sts, retrieval = settings.evaluate.custom_tasks
    assert isinstance(intent, CustomClassificationTask)
    assert (intent.text_column, intent.label_column, intent.samples_per_label, intent.n_experiments) == (
        "utterance",
        "intent",
        8,
        10,
    )
    assert isinstance(sts, CustomSTSTask)
    assert (sts.format, sts.min_score, sts.max_score, sts.languages) == ("jsonl", 0.0, 5.0, ["eng-Latn"])
    assert isinstance(retrieval, CustomRetrievalTask)
    assert retrieval.qrels == "data/my_ret/qrels/test.tsv"


@pytest.mark.parametrize(
    ("custom", "message"),
    [
        ([{"name": "X", "type": "Clustering", "test": "a.jsonl"}], "custom_tasks.0: Input tag 'Clustering'"),
        ([{"name": "X", "type": "STS"}], r"custom_tasks\.0\.STS\.test: Field required"),
        ([{"name": "X", "type": "Classification", "train": "a", "test": "b", "colour": 1}], "colour"),
        ([{"name": "X", "type": "STS", "test": "a", "min_score": 5, "max_score": 1}], "must be greater"),
        ([{"name": "a/b", "type": "STS", "test": "a"}], r"custom_tasks\.0\.STS\.name"),
        ([{"name": "SciFact", "type": "STS", "test": "a"}], "are local tasks already"),
        ([{"name": "X", "type": "STS", "test": "a"}] * 2, "duplicate custom_tasks names"),
    ],
)
def test_bad_custom_tasks_are_named(repo_root: Path, tmp_path: Path, custom: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from_dict(_raw(repo_root, custom_tasks=custom), tmp_path)


def test_tasks_must_be_local_custom_or_hub(repo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown tasks \['MySTS'\].*STSBenchmark.*mteb:"):
        settings_from_dict(_raw(repo_root, tasks=["STSBenchmark", "MySTS"]), tmp_path)
    with pytest.raises(ConfigError, match="duplicate tasks"):
        settings_from_dict(_raw(repo_root, tasks=["STSBenchmark", "STSBenchmark"]), tmp_path)
    # Hub names are resolved by mteb when the tasks are built, not here
    settings = settings_from_dict(_raw(repo_root, tasks=["mteb:MTEB(eng, v2)", "STSBenchmark"]), tmp_path)
    assert settings.evaluate.tasks == ["mteb:MTEB(eng, v2)", "STSBenchmark"]


def test_gate_required_tasks_with_hub_entries(repo_root: Path, tmp_path: Path) -> None:
    raw = _raw(repo_root, tasks=["mteb:STS12", "STSBenchmark"])
    raw["gate"]["required_tasks"] = ["STS12", "STSBenchmark"]
    assert settings_from_dict(raw, tmp_path).gate.required_tasks == ["STS12", "STSBenchmark"]

    raw = _raw(repo_root, tasks=["STSBenchmark"])
    raw["gate"]["required_tasks"] = ["STS12"]
    with pytest.raises(ConfigError, match="gate.required_tasks names tasks not in evaluate.tasks"):
        settings_from_dict(raw, tmp_path)
