"""The offline MTEB task pack and evaluate_model's result cache, with the real all-MiniLM-L6-v2.

STSBenchmark and Banking77Classification (about 40 s together on 2 quiet CPU cores) are scored
with MiniLM against its published MTEB scores. Emotion, TweetSentimentExtraction and SciFact are
scored end to end with the tiny random model instead (the plumbing, not the number): with MiniLM
they add about 40 s and 4.5 minutes (SciFact); BENCHMARKS.md has their MiniLM scores.
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gist_core.catalogue import DEFAULT_DATA_DIR, LOCAL_TASKS
from gist_core.errors import EvaluationError
from gist_core.evaluation.tasks import build_task, build_tasks

pytestmark = pytest.mark.slow

MODEL_NAME = "gist-test/all-MiniLM-L6-v2"

# name -> (abstract task class, official task "module:Class", data folder, files hashed, main score)
EXPECTED: dict[str, tuple[str, str, str, tuple[str, ...], str]] = {
    "STSBenchmark": (
        "mteb.abstasks.sts:AbsTaskSTS",
        "mteb.tasks.sts.eng.sts_benchmark_sts:STSBenchmarkSTS",
        "sts",
        ("stsb.test.jsonl",),
        "cosine_spearman",
    ),
    "Banking77Classification": (
        "mteb.abstasks.classification:AbsTaskClassification",
        "mteb.tasks.classification.eng.banking77_classification:Banking77Classification",
        "classification/banking77",
        ("test.csv", "train.csv"),
        "accuracy",
    ),
    "EmotionClassification": (
        "mteb.abstasks.classification:AbsTaskClassification",
        "mteb.tasks.classification.eng.emotion_classification:EmotionClassification",
        "classification/emotion",
        ("test.txt", "train.txt", "validation.txt"),
        "accuracy",
    ),
    "TweetSentimentExtractionClassification": (
        "mteb.abstasks.classification:AbsTaskClassification",
        "mteb.tasks.classification.eng.tweet_sentiment_extraction_classification"
        ":TweetSentimentExtractionClassification",
        "classification/tweet_sentiment_extraction",
        ("test.csv", "train.csv"),
        "accuracy",
    ),
    "SciFact": (
        "mteb.abstasks.retrieval:AbsTaskRetrieval",
        "mteb.tasks.retrieval.eng.sci_fact_retrieval:SciFact",
        "retrieval/scifact",
        ("corpus.jsonl.gz", "qrels/test.tsv", "queries.jsonl"),
        "ndcg_at_10",
    ),
}

# Row counts from data/raw/SOURCES.md.
CLASSIFICATION_ROWS = {
    "Banking77Classification": ({"train": 10003, "test": 3080}, 77),
    "EmotionClassification": ({"train": 16000, "validation": 2000, "test": 2000}, 6),
    "TweetSentimentExtractionClassification": ({"train": 27480, "test": 3534}, 3),
}

# The licence of the shipped files where it differs from the official card (data/raw/SOURCES.md).
LICENSES = {"Banking77Classification": "cc-by-4.0"}

# all-MiniLM-L6-v2 on the MTEB leaderboard (mteb's own protocol): STSBenchmark 82.03, Banking77 80.04.
PUBLISHED = {"STSBenchmark": 0.8203, "Banking77Classification": 0.8004}
TOLERANCE = 0.02


def _import(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------- building and loading


def test_local_tasks_are_the_five() -> None:
    assert set(LOCAL_TASKS) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_task_metadata_copies_the_official_task(name: str) -> None:
    base, official_ref, folder, files, main_score = EXPECTED[name]
    task = build_task(name, DEFAULT_DATA_DIR)
    official = _import(official_ref)

    assert isinstance(task, _import(base))
    meta = task.metadata
    assert meta.name == name
    assert meta.main_score == main_score
    assert meta.dataset == {"path": f"local/{folder}", "revision": _revision(DEFAULT_DATA_DIR, folder, files)}
    assert "Local offline copy" in meta.description
    assert meta.description.startswith(official.metadata.description)
    assert meta.adapted_from == [official.metadata.name]  # the marker: a copy of the official task
    assert meta.bibtex_citation and meta.bibtex_citation == official.metadata.bibtex_citation
    assert meta.license == LICENSES.get(name, official.metadata.license) and meta.license
    # everything else is the official task's metadata, field for field
    ours = meta.model_dump(exclude={"dataset", "description", "adapted_from", "license"})
    assert ours == official.metadata.model_dump(exclude={"dataset", "description", "adapted_from", "license"})
    # and so is its protocol (e.g. samples_per_label 16 for Emotion, 32 for Tweet)
    for attr in ("samples_per_label", "n_experiments", "train_split", "min_score", "max_score", "k_values"):
        if hasattr(official, attr):
            assert getattr(task, attr) == getattr(official, attr), attr
    # the published task's metadata is untouched
    assert official.metadata.dataset["path"].startswith("mteb/")


def _revision(data_dir: Path, folder: str, files: tuple[str, ...]) -> str:
    """The content hash, recomputed here: sha256 of (path below data_dir, sha256 of bytes), sorted."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        path = data_dir / folder / rel
        digest.update(path.relative_to(data_dir).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:40]


def test_sts_loads() -> None:
    task = build_task("STSBenchmark", DEFAULT_DATA_DIR)
    task.load_data()
    assert task.data_loaded
    test = task.dataset["default"]["test"]
    assert len(test) == 1379
    assert {"sentence1", "sentence2", "score"} <= set(test.column_names)
    assert min(test["score"]) >= 0 and max(test["score"]) <= 5


@pytest.mark.parametrize("name", list(CLASSIFICATION_ROWS))
def test_classification_loads(name: str) -> None:
    rows, n_labels = CLASSIFICATION_ROWS[name]
    task = build_task(name, DEFAULT_DATA_DIR)
    task.load_data()
    data = task.dataset["default"]
    assert {split: len(data[split]) for split in data} == rows
    for split in rows:
        assert {"text", "label"} <= set(data[split].column_names)
    assert data["train"].features["label"].num_classes == n_labels
    assert set(task.metadata.eval_splits) <= set(rows)
    assert task.train_split in rows


def test_emotion_splits_on_the_last_separator(tmp_path: Path) -> None:
    data_dir = _copy_data(tmp_path, "classification/emotion")
    path = data_dir / "classification/emotion/test.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[1] = "i feel; oddly; fine;joy"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    task = build_task("EmotionClassification", data_dir)
    task.load_data()
    first = task.dataset["default"]["test"][0]
    assert (first["text"], first["label_text"]) == ("i feel; oddly; fine", "joy")


def test_scifact_loads() -> None:
    task = build_task("SciFact", DEFAULT_DATA_DIR)
    task.load_data()
    split = task.dataset["default"]["test"]
    assert len(split["corpus"]) == 5183
    assert len(split["queries"]) == 300  # the test claims with judgements (of 1109 in queries.jsonl)
    assert len(split["relevant_docs"]) == 300
    assert sum(len(docs) for docs in split["relevant_docs"].values()) == 339
    assert split["top_ranked"] is None
    assert {"id", "title", "text"} <= set(split["corpus"].column_names)
    assert set(split["queries"]["id"]) == set(split["relevant_docs"])


# ---------------------------------------------------------------- revision and errors


def _copy_data(tmp_path: Path, *folders: str) -> Path:
    data_dir = tmp_path / "raw"
    for folder in folders:
        shutil.copytree(DEFAULT_DATA_DIR / folder, data_dir / folder)
    return data_dir


def test_revision_is_the_content_not_the_location(tmp_path: Path) -> None:
    data_dir = _copy_data(tmp_path, "classification/banking77")
    here = build_task("Banking77Classification", data_dir).metadata.revision
    assert here == build_task("Banking77Classification", DEFAULT_DATA_DIR).metadata.revision


def test_changing_a_data_file_changes_the_revision(tmp_path: Path) -> None:
    data_dir = _copy_data(tmp_path, "classification/banking77")
    before = build_task("Banking77Classification", data_dir)
    path = data_dir / "classification/banking77/test.csv"
    path.write_text(path.read_text(encoding="utf-8").replace("How do I locate my card?", "Where is my card?", 1))
    after = build_task("Banking77Classification", data_dir)

    assert after.metadata.revision != before.metadata.revision
    assert after.metadata.revision == _revision(data_dir, "classification/banking77", ("test.csv", "train.csv"))
    assert before.metadata.revision == build_task("Banking77Classification", DEFAULT_DATA_DIR).metadata.revision
    after.load_data()
    assert after.dataset["default"]["test"][0]["text"] == "Where is my card?"


def test_unknown_task_names_the_task_and_the_known_ones() -> None:
    with pytest.raises(EvaluationError) as err:
        build_task("STS12", DEFAULT_DATA_DIR)
    assert "'STS12'" in str(err.value)
    for name in LOCAL_TASKS:
        assert name in str(err.value)


def test_missing_data_file_is_named(tmp_path: Path) -> None:
    data_dir = _copy_data(tmp_path, "retrieval/scifact")
    (data_dir / "retrieval/scifact/qrels/test.tsv").unlink()
    with pytest.raises(EvaluationError, match=r"SciFact: data file not found: .*qrels/test\.tsv"):
        build_task("SciFact", data_dir)


def test_build_tasks_keeps_order_and_rejects_duplicates() -> None:
    tasks = build_tasks(["SciFact", "STSBenchmark"], DEFAULT_DATA_DIR)
    assert [t.metadata.name for t in tasks] == ["SciFact", "STSBenchmark"]
    with pytest.raises(EvaluationError, match="duplicate"):
        build_tasks(["STSBenchmark", "STSBenchmark"], DEFAULT_DATA_DIR)


def test_unloading_keeps_the_local_metadata() -> None:
    task = build_task("STSBenchmark", DEFAULT_DATA_DIR)
    revision = task.metadata.revision
    task.load_data()
    task.unload_data()  # mteb.evaluate does this after a run
    assert not task.data_loaded and task.dataset is None
    assert task.metadata.revision == revision and task.metadata.dataset["path"] == "local/sts"


# ---------------------------------------------------------------- scoring and the result cache


class EncodeCounter:
    """Wraps a model's encode (an instance attribute shadows the method); can stop after the first call."""

    def __init__(self, model: Any) -> None:
        self.inner = model.encode
        self.calls = 0
        self.stop = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.stop:
            raise RuntimeError("encode called")
        return self.inner(*args, **kwargs)


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture
def counter(minilm: Any) -> Iterator[EncodeCounter]:
    counter = EncodeCounter(minilm)
    minilm.encode = counter
    try:
        yield counter
    finally:
        del minilm.encode


@pytest.fixture(scope="module")
def first_run(minilm: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Score STSBenchmark and Banking77 once (the slow part), on a copy of their data."""
    from gist_core.evaluation.evaluate import evaluate_model

    tmp = tmp_path_factory.mktemp("first-run")
    data_dir = _copy_data(tmp, "sts", "classification/banking77")
    cache_dir = tmp / "mteb-cache"
    card = minilm.model_card_data
    card_before = (card.model_name, card.base_model_revision)
    counter = EncodeCounter(minilm)
    minilm.encode = counter
    try:
        scores = evaluate_model(
            minilm,
            model_name=MODEL_NAME,
            model_revision="rev-a",
            tasks=build_tasks(list(PUBLISHED), data_dir),
            cache_dir=cache_dir,
            show_progress_bar=False,
        )
    finally:
        del minilm.encode
    return {
        "scores": scores,
        "encode_calls": counter.calls,
        "data_dir": data_dir,
        "cache_dir": cache_dir,
        "card_before": card_before,
        "card_after": (card.model_name, card.base_model_revision),
    }


def test_minilm_scores_like_its_published_mteb_scores(first_run: dict[str, Any]) -> None:
    scores = first_run["scores"]
    assert list(scores) == list(PUBLISHED)
    got = {name: round(s.main_score, 4) for name, s in scores.items()}
    print(f"all-MiniLM-L6-v2 on the local tasks: {got} (published {PUBLISHED})")
    for name, published in PUBLISHED.items():
        assert scores[name].main_score == pytest.approx(published, abs=TOLERANCE), name
    assert scores["STSBenchmark"].main_score_name == "cosine_spearman"
    assert scores["STSBenchmark"].category == "STS"
    assert scores["Banking77Classification"].main_score_name == "accuracy"
    assert scores["Banking77Classification"].category == "Classification"
    import mteb

    for name, s in scores.items():
        assert s.task_revision == build_task(name, first_run["data_dir"]).metadata.revision
        assert s.mteb_version == mteb.__version__
        assert s.evaluation_time and s.evaluation_time > 0
    assert first_run["encode_calls"] > 0


def test_each_distinct_text_is_encoded_once(first_run: dict[str, Any]) -> None:
    """STSBenchmark's 1379 pairs hold 2758 sentences, 2552 distinct: mteb asks for all, the model encodes each once."""
    sts = first_run["scores"]["STSBenchmark"].encoding
    assert (sts["texts"], sts["encoded"]) == (2758, 2552)
    # Banking77: mteb encodes the union of the 10 experiments' training samples once, then the test split
    banking = first_run["scores"]["Banking77Classification"].encoding
    assert banking["texts"] == banking["encoded"] > 3080


@pytest.mark.parametrize("name", ["EmotionClassification", "TweetSentimentExtractionClassification", "SciFact"])
def test_other_local_tasks_score_end_to_end(name: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The tiny random model through each remaining task: mteb runs it and stores a result (its value is noise)."""
    from sentence_transformers import SentenceTransformer

    from gist_core.evaluation.evaluate import evaluate_model

    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    task = build_task(name, DEFAULT_DATA_DIR)
    scores = evaluate_model(
        model,
        model_name="gist-test/tiny",
        model_revision="tiny",
        tasks=[task],
        cache_dir=tmp_path,
        show_progress_bar=False,
    )
    score = scores[name]
    assert 0.0 <= score.main_score <= 1.0
    assert (score.main_score_name, score.category) == (EXPECTED[name][4], task.metadata.type)
    assert score.task_revision == task.metadata.revision
    assert score.encoding is not None and score.encoding["encoded"] <= score.encoding["texts"]
    assert (tmp_path / "results" / "gist-test__tiny" / "tiny" / f"{name}.json").is_file()


def test_results_are_stored_under_name_and_revision(first_run: dict[str, Any]) -> None:
    folder = first_run["cache_dir"] / "results" / MODEL_NAME.replace("/", "__") / "rev-a"
    assert sorted(p.name for p in folder.glob("*.json") if p.name != "model_meta.json") == [
        "Banking77Classification.json",
        "STSBenchmark.json",
    ]


def test_model_card_is_restored(first_run: dict[str, Any]) -> None:
    assert first_run["card_after"] == first_run["card_before"]


def test_same_revision_is_served_from_the_cache(
    first_run: dict[str, Any], minilm: Any, counter: EncodeCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gist_core.evaluation.evaluate import evaluate_model

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    counter.stop = True
    again = evaluate_model(
        minilm,
        model_name=MODEL_NAME,
        model_revision="rev-a",
        tasks=build_tasks(list(PUBLISHED), first_run["data_dir"]),
        cache_dir=first_run["cache_dir"],
        show_progress_bar=False,
    )
    assert counter.calls == 0
    assert again == first_run["scores"]


def test_another_revision_encodes_again(first_run: dict[str, Any], minilm: Any, counter: EncodeCounter) -> None:
    from gist_core.evaluation.evaluate import evaluate_model

    counter.stop = True  # the first encode proves the cache was not used; no need to finish the run
    with pytest.raises(EvaluationError, match="STSBenchmark: evaluation failed"):
        evaluate_model(
            minilm,
            model_name=MODEL_NAME,
            model_revision="rev-b",
            tasks=build_tasks(["STSBenchmark"], first_run["data_dir"]),
            cache_dir=first_run["cache_dir"],
            show_progress_bar=False,
        )
    assert counter.calls == 1
    assert minilm.model_card_data.model_name == first_run["card_before"][0]  # restored after a failure too


def test_changed_task_data_encodes_again(
    first_run: dict[str, Any], minilm: Any, counter: EncodeCounter, tmp_path: Path
) -> None:
    """Same model revision, but the task's data changed: mteb alone would serve the stale result."""
    from gist_core.evaluation.evaluate import evaluate_model

    data_dir = _copy_data(tmp_path, "sts")
    path = data_dir / "sts/stsb.test.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")  # drop the last pair

    counter.stop = True
    with pytest.raises(EvaluationError, match="STSBenchmark: evaluation failed"):
        evaluate_model(
            minilm,
            model_name=MODEL_NAME,
            model_revision="rev-a",
            tasks=build_tasks(["STSBenchmark"], data_dir),
            cache_dir=first_run["cache_dir"],
            show_progress_bar=False,
        )
    assert counter.calls == 1
