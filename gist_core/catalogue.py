"""The evaluation tasks this project ships: which official MTEB task each copies and where its files are.

Plain data and file readers, no mteb: the settings check task names against it (``config``), the
data stage reads the evaluation splits to keep them out of the training data
(``data.contamination``), and ``evaluation.tasks`` builds mteb task classes from it.

The data lives under ``evaluate.data_dir`` (``data/raw``; provenance in ``data/raw/SOURCES.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gist_core.errors import DataError
from gist_core.readers import SkippedRow, TableFormat, first_rows, read_json_objects, read_qrels, read_records

HUB_PREFIX = "mteb:"  # evaluate.tasks entries naming mteb's official tasks or benchmarks
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "raw"

Kind = Literal["STS", "Classification", "Retrieval"]
# (texts, label names) of one classification split
LabelledTexts = tuple[list[str], list[str]]

# The main score mteb's own tasks of each type use (custom tasks may set another).
DEFAULT_MAIN_SCORE: dict[str, str] = {
    "STS": "cosine_spearman",
    "Classification": "accuracy",
    "Retrieval": "ndcg_at_10",
}


@dataclass(frozen=True)
class LocalTaskSpec:
    """Where a local task's data lives and which official mteb task it copies."""

    name: str
    kind: Kind
    official: str  # "module:Class" of the official task whose metadata and protocol are copied
    folder: str  # relative to data_dir; the task's dataset path is "local/<folder>"
    # role -> file relative to folder. STS/classification: role = split name;
    # retrieval: "corpus", "queries" and one qrels file per split name.
    files: Mapping[str, str]
    # classification only: how a split file is read
    format: TableFormat = "csv"
    text_column: str = "text"
    label_column: str = "label"
    separator: str = ";"
    license: str | None = None  # the licence of the shipped files when it differs from the official task's

    def paths(self, data_dir: Path) -> dict[str, Path]:
        return {role: data_dir / self.folder / rel for role, rel in self.files.items()}


SPECS: dict[str, LocalTaskSpec] = {
    s.name: s
    for s in (
        LocalTaskSpec(
            name="STSBenchmark",
            kind="STS",
            official="mteb.tasks.sts.eng.sts_benchmark_sts:STSBenchmarkSTS",
            folder="sts",
            files={"test": "stsb.test.jsonl"},
        ),
        LocalTaskSpec(
            name="Banking77Classification",
            kind="Classification",
            official="mteb.tasks.classification.eng.banking77_classification:Banking77Classification",
            folder="classification/banking77",
            files={"train": "train.csv", "test": "test.csv"},
            label_column="category",
            license="cc-by-4.0",  # PolyAI's repository (LICENSE beside the files); mteb's card says mit
        ),
        LocalTaskSpec(
            name="EmotionClassification",
            kind="Classification",
            official="mteb.tasks.classification.eng.emotion_classification:EmotionClassification",
            folder="classification/emotion",
            # mteb 2.x evaluates test only; validation is loaded too so filter_eval_splits can add it.
            files={"train": "train.txt", "validation": "validation.txt", "test": "test.txt"},
            format="lastsep",
            label_column="label_name",
        ),
        LocalTaskSpec(
            name="TweetSentimentExtractionClassification",
            kind="Classification",
            official=(
                "mteb.tasks.classification.eng.tweet_sentiment_extraction_classification"
                ":TweetSentimentExtractionClassification"
            ),
            folder="classification/tweet_sentiment_extraction",
            files={"train": "train.csv", "test": "test.csv"},
            label_column="sentiment",
        ),
        LocalTaskSpec(
            name="SciFact",
            kind="Retrieval",
            official="mteb.tasks.retrieval.eng.sci_fact_retrieval:SciFact",
            folder="retrieval/scifact",
            files={"corpus": "corpus.jsonl.gz", "queries": "queries.jsonl", "test": "qrels/test.tsv"},
        ),
    )
}

LOCAL_TASKS: tuple[str, ...] = tuple(SPECS)


def spec_of(name: str) -> LocalTaskSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise DataError(f"unknown local task {name!r}; known tasks: {', '.join(LOCAL_TASKS)}") from None


def check_files(task: str, paths: Mapping[str, Path]) -> None:
    for role, path in paths.items():
        if not path.is_file():
            raise DataError(f"task {task}: data file not found: {path} ({role})")


def strict_records(path: Path, fmt: TableFormat, *, separator: str = ";") -> Any:
    """All rows of an evaluation file; an evaluation set with an unreadable row is refused, naming it.

    Same reader and bad-row rules as the training data; only the policy differs: dropping a row
    would change what a score means, so an unreadable row (other than a blank line) fails the task.
    """
    skipped: list[SkippedRow] = []
    frame = read_records(path, fmt, skipped, separator=separator)
    _refuse_unreadable(path, skipped)
    return frame


def _refuse_unreadable(path: Path, skipped: list[SkippedRow]) -> None:
    unreadable = [s for s in skipped if s.reason != "blank line"]  # blank lines are no rows at all
    if unreadable:
        raise DataError(f"{path}: {len(unreadable)} unreadable row(s): {first_rows(unreadable)}")


def read_labelled_split(spec: LocalTaskSpec, path: Path) -> LabelledTexts:
    """One classification split: every row kept (texts may be empty or span lines), labels stripped."""
    frame = strict_records(path, spec.format, separator=spec.separator)
    missing = [c for c in (spec.text_column, spec.label_column) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (has {[c for c in frame.columns if c != 'row']})")
    texts = [str(t) for t in frame[spec.text_column].tolist()]
    labels = [str(label).strip() for label in frame[spec.label_column].tolist()]
    return texts, labels


def read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON Lines evaluation file (``.gz`` allowed), in order; blank lines are allowed."""
    skipped: list[SkippedRow] = []
    rows = read_json_objects(path, skipped)
    _refuse_unreadable(path, skipped)
    for row in rows:
        del row["row"]
    return rows


def eval_split_texts(task: str, data_dir: Path) -> dict[str, list[str]]:
    """The texts of a local task's evaluation splits, keyed ``Task/split`` (train splits are left out)."""
    spec = SPECS.get(task)
    if spec is None:
        raise DataError(f"contamination check: {task!r} is not a local task (known: {', '.join(SPECS)})")
    paths = spec.paths(data_dir)
    for role, path in paths.items():
        if not path.is_file():
            raise DataError(f"contamination check: {path} not found ({task} {role}; evaluate.data_dir)")
    out: dict[str, list[str]] = {}
    if spec.kind == "STS":
        for split, path in paths.items():
            out[f"{task}/{split}"] = [str(r[k]) for r in read_jsonl_rows(path) for k in ("sentence1", "sentence2")]
    elif spec.kind == "Classification":
        for split, path in paths.items():
            if split != "train":
                out[f"{task}/{split}"] = read_labelled_split(spec, path)[0]
    else:  # Retrieval
        queries = {str(r["_id"]): str(r["text"]) for r in read_jsonl_rows(paths["queries"])}
        for split, path in paths.items():
            if split not in ("corpus", "queries"):
                out[f"{task}/{split} queries"] = [queries[q] for q in read_qrels(path) if q in queries]
        corpus = []
        for r in read_jsonl_rows(paths["corpus"]):
            title, text = str(r.get("title") or ""), str(r.get("text") or "")
            corpus += [t for t in (title, text, f"{title} {text}".strip()) if t]
        out[f"{task}/corpus"] = corpus
    return out
