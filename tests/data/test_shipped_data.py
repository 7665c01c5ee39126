"""Expectations on the data shipped in the repo, on mining it, and on the default data stage's output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from gist_core.catalogue import LOCAL_TASKS
from gist_core.config import ClassificationSource, load_settings, with_overrides
from gist_core.data.classification import read_classification_source
from gist_core.data.contamination import build_contamination_index, normalize_text
from gist_core.data.guide_encoder import GuideEncoder
from gist_core.data.mine import mine_all, write_mined
from gist_core.errors import DataError
from gist_core.models import load_sentence_transformer, resolve_model
from tests.support.projects import REPO, cli_env, make_project, run

EXPECTED_ROWS = {
    "Banking77Classification": 10003,
    "EmotionClassification": 16000,
    "TweetSentimentExtractionClassification": 27480,
}
BUCKETS = ("quarantined", "degenerate", "duplicates", "decontaminated", "not_sampled")
POOL, CAP = 400, 300  # texts mined per task, triplets kept per task: the default's shape, smaller


def test_provenance_and_licences_are_shipped(repo_root: Path) -> None:
    raw = repo_root / "data" / "raw"
    sources = (raw / "SOURCES.md").read_text()
    for needle in ("PolyAI-LDN/task-specific-datasets", "STSBenchmark", "SciFact"):
        assert needle in sources
    assert (raw / "classification" / "banking77" / "LICENSE").is_file()
    assert (raw / "sts" / "stsbenchmark" / "LICENSE.txt").is_file()


def test_train_splits_read_completely(repo_root: Path) -> None:
    settings = load_settings(repo_root)
    for source in settings.data.classification:
        frame, skipped, input_rows = read_classification_source(source, repo_root)
        assert input_rows == EXPECTED_ROWS[source.name]
        assert not skipped and len(frame) == input_rows, skipped[:3]
    labels = {
        s.name: read_classification_source(s, repo_root)[0]["label"].nunique() for s in settings.data.classification
    }
    assert labels == {
        "Banking77Classification": 77,
        "EmotionClassification": 6,
        "TweetSentimentExtractionClassification": 3,
    }


# ---------------------------------------------------------------- mining the shipped splits (MiniLM as guide)


@pytest.fixture(scope="module")
def mined_twice(repo_root: Path, minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """Mine the shipped train splits twice with the same seed (small pools; the second from the cache)."""
    tmp = tmp_path_factory.mktemp("mined")
    settings = with_overrides(
        load_settings(repo_root),
        {"data.mining.max_texts_per_task": 200, "data.mining.cache_dir": str(tmp / "cache")},
    )
    ref = resolve_model(str(minilm_dir), minilm_dir.parent)
    model = load_sentence_transformer(ref, 128)
    runs = []
    for attempt in range(2):
        guide = GuideEncoder("MiniLM", "minilm", lambda: model, 128, cache_root=tmp / "cache")
        mined = mine_all(settings.data, repo_root, settings.base.seed, guide)
        write_mined(mined, tmp / f"run{attempt}")
        runs.append((mined, guide))
    return runs, tmp


def test_mining_with_the_same_seed_is_byte_identical(mined_twice) -> None:  # noqa: ANN001
    runs, tmp = mined_twice
    assert runs[1][1].encoded == 0 and runs[1][1].from_cache > 0  # the rerun encoded nothing
    for name in ("triplets.parquet", "skipped.csv", "report.json"):
        assert (tmp / "run0" / name).read_bytes() == (tmp / "run1" / name).read_bytes(), name


def test_mined_positives_share_the_label_and_beat_a_random_same_label_text(mined_twice, repo_root: Path) -> None:  # noqa: ANN001
    (mined, _), _ = mined_twice[0]
    data = mined.triplets
    assert set(data["task_name"]) == set(EXPECTED_ROWS)
    # the label columns are what the files say
    for source in load_settings(repo_root).data.classification:
        frame, _, _ = read_classification_source(source, repo_root)
        labels = frame.groupby("text")["label"].agg(set)
        task = data[data["task_name"] == source.name]
        assert all(row.anchor_label in labels[row.anchor] for row in task.itertuples())
        assert all(row.positive_label in labels[row.positive] for row in task.itertuples())
    assert (data["positive_label"] == data["anchor_label"]).all()
    assert (data["negative_label"] != data["anchor_label"]).all()
    assert not ((data["anchor"] == data["positive"]) | (data["anchor"] == data["negative"])).any()
    for report in mined.reports:
        mean_pos = data.loc[data["source"] == report.name, "guide_pos_sim"].mean()
        assert mean_pos > report.guide_random_same_label_sim_mean + 0.05, (report.name, mean_pos)


def test_a_corrupted_input_file_names_file_and_row(repo_root: Path, tmp_path: Path) -> None:
    lines = (repo_root / "data/raw/classification/banking77/train.csv").read_bytes().splitlines()
    source = ClassificationSource(name="B", path="train.csv", text_column="text", label_column="category")
    one_bad = [*lines[:42], b"\xc3\x28 broken bytes," + lines[42].split(b",")[-1], *lines[43:]]
    (tmp_path / "train.csv").write_bytes(b"\n".join(one_bad) + b"\n")
    frame, skipped, input_rows = read_classification_source(source, tmp_path)
    assert input_rows == 10003 and len(frame) == 10002
    assert [(s.file, s.row, s.reason) for s in skipped] == [("train.csv", 42, "not valid UTF-8")]
    mostly_bad = [lines[0], *(b"\xff" + line for line in lines[1:])]
    (tmp_path / "train.csv").write_bytes(b"\n".join(mostly_bad) + b"\n")
    with pytest.raises(
        DataError, match=r"train\.csv: (\d+) of \1 rows are unusable .*first: row 1 \(text: not valid UTF-8\)"
    ):
        read_classification_source(source, tmp_path, max_bad_fraction=0.5)


# ---------------------------------------------------------------- the default data stage's output


@pytest.fixture(scope="module")
def default_output(tmp_path_factory: pytest.TempPathFactory, guide_models_dir: Path):  # noqa: ANN201
    """The triplets and report of `dvc repro data`, run as a user would in a copy of the project.

    The default params (the mpnet guide, every source, the contamination checks and the guide's
    verdicts) with smaller pools, so it runs in well under a minute: the checks below are properties
    of the stages, not of the pool size.
    """
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"]["models_dir"] = str(guide_models_dir)
    params["data"]["mining"]["max_texts_per_task"] = POOL
    params["data"]["mining"]["cache_dir"] = str(tmp_path_factory.mktemp("guide-embeddings"))
    params["data"]["max_per_task"] = CAP
    project = make_project(tmp_path_factory.mktemp("shipped") / "proj", params)
    run([sys.executable, "-m", "dvc", "repro", "data"], project, env=cli_env(project.parent))
    assert run([sys.executable, "-m", "dvc", "status", "data"], project).stdout.strip().endswith("up to date.")
    settings = load_settings(project)
    data = pd.read_parquet(settings.path(settings.data.output))
    return data, json.loads(settings.path(settings.data.report).read_text()), settings


def test_default_output_row_accounting(default_output) -> None:  # noqa: ANN001
    data, report, settings = default_output
    totals = report["totals"]
    assert totals["input_rows"] == sum(EXPECTED_ROWS.values())
    for source in report["sources"].values():
        assert source["input_rows"] == source["kept"] + sum(source[b] for b in BUCKETS), source["name"]
        assert sum(source["reasons"].values()) == source["input_rows"] - source["kept"]
    assert totals["kept"] == len(data) == sum(report["rows_per_task"].values())
    assert report["rows_per_task"] == data["task_name"].value_counts().to_dict()
    assert set(report["rows_per_task"]) == set(EXPECTED_ROWS)
    assert max(report["rows_per_task"].values()) == settings.data.max_per_task == CAP
    assert not data.duplicated(["anchor", "positive", "negative"]).any()


def test_default_output_labels_and_guide(default_output) -> None:  # noqa: ANN001
    data, report, _ = default_output
    assert (data["positive_label"] == data["anchor_label"]).all()
    assert (data["negative_label"] != data["anchor_label"]).all()
    assert not ((data["anchor"] == data["positive"]) | (data["anchor"] == data["negative"])).any()
    assert report["guide"]["name"] == "all-mpnet-base-v2" and data["guide_pos_sim"].notna().all()
    flagged = (data["guide_neg_sim"] >= data["guide_pos_sim"]).sum()
    assert report["totals"]["guide_flagged"] == flagged and report["totals"]["guide_scored"] == len(data)
    for source in report["sources"].values():
        assert source["guide_pos_sim_mean"] > source["guide_random_same_label_sim_mean"], source["name"]


def test_default_output_has_no_text_of_any_evaluation_split(default_output, repo_root: Path) -> None:  # noqa: ANN001
    data, _, _ = default_output
    index = build_contamination_index(LOCAL_TASKS, repo_root / "data" / "raw")
    texts = pd.unique(data[["anchor", "positive", "negative"]].to_numpy().ravel())
    found = {t: index.where[normalize_text(t)] for t in texts if normalize_text(t) in index.where}
    assert not found, list(found.items())[:5]
