"""Offline MTEB tasks: local copies of official tasks, built with mteb's own task classes.

Each local task keeps the official task's name, TaskMetadata (type, splits, main score, licence,
citation, ...) and evaluation protocol (class attributes such as ``samples_per_label``), but reads
the real data shipped under ``data/raw`` (see ``data/raw/SOURCES.md``) instead of downloading it
from the Hugging Face Hub. Its ``dataset`` is ``{"path": "local/<data folder>", "revision": <content
hash>}``: the revision is a hash of the data files the task reads, computed when the task object is
built, so any edit to a file gives the task a new revision and mteb's result files record it.

mteb takes seconds to import, so the task classes are created on first use, not at import time.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import importlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar, Literal

from gist_core.errors import EvaluationError

if TYPE_CHECKING:
    from mteb.abstasks.abstask import AbsTask
    from mteb.abstasks.task_metadata import TaskMetadata

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "raw"
REVISION_CHARS = 40

# (texts, label names) of one classification split
LabelledTexts = tuple[list[str], list[str]]


# ---------------------------------------------------------------- readers: plain Python, no mteb


def _open_text(path: Path) -> IO[str]:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object a line (``.gz`` is decompressed); blank lines are skipped."""
    rows = []
    with _open_text(path) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise EvaluationError(f"{path}:{line_no}: not valid JSON: {err}") from None
    return rows


def read_sts_jsonl(path: Path) -> dict[str, list]:
    """Normalized STS pairs: columns sentence1, sentence2, score (0-5)."""
    rows = read_jsonl(path)
    columns: dict[str, list] = {"sentence1": [], "sentence2": [], "score": []}
    for i, row in enumerate(rows, start=1):
        try:
            columns["sentence1"].append(str(row["sentence1"]))
            columns["sentence2"].append(str(row["sentence2"]))
            columns["score"].append(float(row["score"]))
        except (KeyError, TypeError, ValueError) as err:
            raise EvaluationError(f"{path}: row {i}: needs sentence1, sentence2 and a numeric score ({err})") from None
    return columns


def read_labelled_csv(path: Path, text_column: str, label_column: str) -> LabelledTexts:
    """A CSV with a header; every row is kept (texts may be empty or span lines), labels are stripped."""
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in (text_column, label_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise EvaluationError(f"{path}: missing column(s) {missing} (has {reader.fieldnames})")
        texts, labels = [], []
        for row in reader:
            texts.append(row[text_column] or "")
            labels.append((row[label_column] or "").strip())
    return texts, labels


def read_last_separator(path: Path, separator: str = ";") -> LabelledTexts:
    """``text<sep>label`` lines after a header line, split on the LAST separator (texts may contain it)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or separator not in lines[0]:
        raise EvaluationError(f"{path}: expected a header line '<text>{separator}<label>'")
    texts, labels = [], []
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        if separator not in line:
            raise EvaluationError(f"{path}:{line_no}: no {separator!r} separator in {line[:80]!r}")
        text, label = line.rsplit(separator, 1)
        texts.append(text)
        labels.append(label.strip())
    return texts, labels


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels (query-id, corpus-id, score; tab-separated, with a header) as {query: {doc: score}}."""
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        missing = [c for c in ("query-id", "corpus-id", "score") if c not in (reader.fieldnames or [])]
        if missing:
            raise EvaluationError(f"{path}: missing column(s) {missing} (has {reader.fieldnames})")
        for i, row in enumerate(reader, start=2):
            try:
                qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
            except (TypeError, ValueError):
                raise EvaluationError(f"{path}:{i}: score {row['score']!r} is not an integer") from None
    return qrels


def content_revision(paths: Sequence[Path], root: Path) -> str:
    """sha256 over each file's path relative to ``root`` and its bytes, truncated to 40 hex characters."""
    digest = hashlib.sha256()
    for path in paths:
        file_hash = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                file_hash.update(chunk)
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(file_hash.digest())
    return digest.hexdigest()[:REVISION_CHARS]


# ---------------------------------------------------------------- the task pack


@dataclass(frozen=True)
class LocalTaskSpec:
    """Where a local task's data lives and which official mteb task it copies."""

    name: str
    kind: Literal["sts", "classification", "retrieval"]
    official: str  # "module:Class" of the official task whose metadata and protocol are copied
    folder: str  # relative to data_dir; the task's dataset path is "local/<folder>"
    # role -> file relative to folder. STS/classification: role = split name;
    # retrieval: "corpus", "queries" and one qrels file per split name.
    files: Mapping[str, str]
    read_split: Callable[[Path], LabelledTexts] | None = None  # classification only

    def paths(self, data_dir: Path) -> dict[str, Path]:
        return {role: data_dir / self.folder / rel for role, rel in self.files.items()}


SPECS: dict[str, LocalTaskSpec] = {
    s.name: s
    for s in (
        LocalTaskSpec(
            name="STSBenchmark",
            kind="sts",
            official="mteb.tasks.sts.eng.sts_benchmark_sts:STSBenchmarkSTS",
            folder="sts",
            files={"test": "stsb.test.jsonl"},
        ),
        LocalTaskSpec(
            name="Banking77Classification",
            kind="classification",
            official="mteb.tasks.classification.eng.banking77_classification:Banking77Classification",
            folder="classification/banking77",
            files={"train": "train.csv", "test": "test.csv"},
            read_split=functools.partial(read_labelled_csv, text_column="text", label_column="category"),
        ),
        LocalTaskSpec(
            name="EmotionClassification",
            kind="classification",
            official="mteb.tasks.classification.eng.emotion_classification:EmotionClassification",
            folder="classification/emotion",
            # mteb 2.x evaluates test only; validation is loaded too so filter_eval_splits can add it.
            files={"train": "train.txt", "validation": "validation.txt", "test": "test.txt"},
            read_split=functools.partial(read_last_separator, separator=";"),
        ),
        LocalTaskSpec(
            name="TweetSentimentExtractionClassification",
            kind="classification",
            official=(
                "mteb.tasks.classification.eng.tweet_sentiment_extraction_classification"
                ":TweetSentimentExtractionClassification"
            ),
            folder="classification/tweet_sentiment_extraction",
            files={"train": "train.csv", "test": "test.csv"},
            read_split=functools.partial(read_labelled_csv, text_column="text", label_column="sentiment"),
        ),
        LocalTaskSpec(
            name="SciFact",
            kind="retrieval",
            official="mteb.tasks.retrieval.eng.sci_fact_retrieval:SciFact",
            folder="retrieval/scifact",
            files={"corpus": "corpus.jsonl.gz", "queries": "queries.jsonl", "test": "qrels/test.tsv"},
        ),
    )
}

LOCAL_TASKS: tuple[str, ...] = tuple(SPECS)

_ABSTASK_BASES = {
    "sts": "mteb.abstasks.sts:AbsTaskSTS",
    "classification": "mteb.abstasks.classification:AbsTaskClassification",
    "retrieval": "mteb.abstasks.retrieval:AbsTaskRetrieval",
}


def _import(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def local_metadata(spec: LocalTaskSpec, data_dir: Path) -> TaskMetadata:
    """The official task's metadata with the local dataset path and the data's content hash."""
    paths = spec.paths(data_dir)
    for role, path in paths.items():
        if not path.is_file():
            raise EvaluationError(f"task {spec.name}: data file not found: {path} ({role})")
    official = _import(spec.official).metadata
    revision = content_revision(sorted(paths.values()), data_dir)
    note = (
        f"Local offline copy of the MTEB task {official.name}, built from the data folder {spec.folder} "
        "(provenance in data/raw/SOURCES.md); dataset.revision is a sha256 content hash of its files, "
        "not a Hugging Face revision."
    )
    description = f"{official.description.strip()} {note}".strip()
    dataset = {"path": f"local/{spec.folder}", "revision": revision}
    return official.model_copy(
        update={"dataset": dataset, "description": description},
        deep=True,  # the published task's metadata stays untouched
    )


class _LocalTask:
    """Mixin placed before an mteb AbsTask: metadata from data_dir, data from local files."""

    spec: ClassVar[LocalTaskSpec]
    metadata: TaskMetadata
    dataset: Any
    data_loaded: bool

    def __init__(self, data_dir: Path | str = DEFAULT_DATA_DIR, seed: int = 42, **kwargs: Any) -> None:
        self.data_dir = Path(data_dir)
        # An instance attribute, set before AbsTask.__init__ reads hf_subsets from it.
        self._local_metadata = local_metadata(self.spec, self.data_dir)
        self.metadata = self._local_metadata
        super().__init__(seed=seed, **kwargs)

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        log.info("loading local task %s from %s", self.spec.name, self.data_dir / self.spec.folder)
        self.dataset = {"default": self._read_dataset(self.spec.paths(self.data_dir))}
        self.data_loaded = True

    def unload_data(self) -> None:
        # Not super(): mteb's version drops the instance's metadata to fall back on the class's
        # published one (and then reads it). A local task's metadata describes its data_dir.
        if not self.data_loaded:
            log.warning("task %s: data not loaded, nothing to unload", self.spec.name)
            return
        self.dataset = None
        self.data_loaded = False
        self.metadata = self._local_metadata

    def _read_dataset(self, paths: dict[str, Path]) -> Any:
        raise NotImplementedError


class _LocalSTS(_LocalTask):
    def _read_dataset(self, paths: dict[str, Path]) -> Any:
        from datasets import Dataset, DatasetDict, Features, Value

        features = Features({"sentence1": Value("string"), "sentence2": Value("string"), "score": Value("float64")})
        return DatasetDict(
            {split: Dataset.from_dict(read_sts_jsonl(path), features=features) for split, path in paths.items()}
        )


class _LocalClassification(_LocalTask):
    def _read_dataset(self, paths: dict[str, Path]) -> Any:
        from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

        assert self.spec.read_split is not None
        splits = {split: self.spec.read_split(path) for split, path in paths.items()}
        train_labels = set(splits["train"][1])
        for split, (_, labels) in splits.items():
            unseen = sorted(set(labels) - train_labels)
            if unseen:
                raise EvaluationError(f"{paths[split]}: labels not in the train split: {unseen[:10]}")
        # Integer ids in sorted label-name order; mteb's sampling and scores depend only on label identity.
        names = sorted(train_labels)
        features = Features({"text": Value("string"), "label": ClassLabel(names=names), "label_text": Value("string")})
        index = {name: i for i, name in enumerate(names)}
        return DatasetDict(
            {
                split: Dataset.from_dict(
                    {"text": texts, "label": [index[x] for x in labels], "label_text": labels},
                    features=features,
                )
                for split, (texts, labels) in splits.items()
            }
        )


class _LocalRetrieval(_LocalTask):
    def _read_dataset(self, paths: dict[str, Path]) -> Any:
        from datasets import Dataset
        from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

        corpus_rows = read_jsonl(paths["corpus"])
        query_rows = read_jsonl(paths["queries"])
        try:
            corpus = Dataset.from_dict(
                {
                    "id": [str(r["_id"]) for r in corpus_rows],
                    "title": [r.get("title") or "" for r in corpus_rows],
                    "text": [r["text"] for r in corpus_rows],
                }
            )
            query_text = {str(r["_id"]): r["text"] for r in query_rows}
        except KeyError as err:
            raise EvaluationError(f"task {self.spec.name}: BEIR rows need _id and text (missing {err})") from None
        data = {}
        for split in self.metadata.eval_splits:
            qrels = read_qrels(paths[split])
            missing = sorted(set(qrels) - set(query_text))
            if missing:
                raise EvaluationError(f"{paths[split]}: query ids not in {paths['queries']}: {missing[:10]}")
            # Like mteb's BEIR loader: keep the queries that have judgements, in file order.
            ids = [qid for qid in query_text if qid in qrels]
            queries = Dataset.from_dict({"id": ids, "text": [query_text[q] for q in ids]})
            data[split] = RetrievalSplitData(corpus=corpus, queries=queries, relevant_docs=qrels, top_ranked=None)
        return data


_MIXINS: dict[str, type[_LocalTask]] = {
    "sts": _LocalSTS,
    "classification": _LocalClassification,
    "retrieval": _LocalRetrieval,
}


@functools.cache
def task_class(name: str) -> type[AbsTask]:
    """The local task class for an official task name (created, and mteb imported, on first use).

    It subclasses mteb's abstract task for the task type and copies the official class's public
    class attributes (its protocol: ``samples_per_label``, ``min_score``/``max_score``, ...).
    """
    spec = _spec(name)
    official = _import(spec.official)
    base = _import(_ABSTASK_BASES[spec.kind])
    if not issubclass(official, base):
        raise EvaluationError(f"task {name}: {spec.official} is not a {base.__name__}; mteb changed?")
    protocol = {k: v for k, v in vars(official).items() if not k.startswith("_") and k != "metadata"}
    return type(
        name,
        (_MIXINS[spec.kind], base),
        {
            **protocol,
            "spec": spec,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"Local offline copy of MTEB's {name} ({base.__name__}), data in {spec.folder}/.",
        },
    )


def _spec(name: str) -> LocalTaskSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise EvaluationError(f"unknown local task {name!r}; known tasks: {', '.join(LOCAL_TASKS)}") from None


def build_task(name: str, data_dir: Path = DEFAULT_DATA_DIR) -> AbsTask:
    """A local task object for ``data_dir``; its metadata (and revision) reflect the files there now."""
    return task_class(name)(data_dir=data_dir)


def build_tasks(names: Sequence[str], data_dir: Path = DEFAULT_DATA_DIR) -> list[AbsTask]:
    """``build_task`` for each name, in order; duplicate names are an error."""
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise EvaluationError(f"duplicate task names: {dupes}")
    return [build_task(name, data_dir) for name in names]


def __getattr__(name: str) -> Any:
    # `from gist_core.tasks import STSBenchmark` works without importing mteb at module import.
    if name in SPECS:
        return task_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
