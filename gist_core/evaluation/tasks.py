"""Evaluation tasks built with mteb's own task classes: the offline pack, user tasks, and Hub tasks.

Three sources, all giving mteb ``AbsTask`` objects that ``gist_core.evaluation.evaluate`` runs alike:

- **The local pack** (``gist_core.catalogue``): offline copies of five official MTEB tasks. Each keeps the
  official task's name, TaskMetadata (type, splits, main score, citation, ...) and evaluation
  protocol (class attributes such as ``samples_per_label``), but reads the real data shipped under
  ``data/raw`` (see ``data/raw/SOURCES.md``) instead of downloading it from the Hugging Face Hub.
  Markers of the copy: ``dataset["path"]`` is ``local/<data folder>``, ``adapted_from`` names the
  official task, and the description says so.
- **Custom tasks** (params.yaml ``evaluate.custom_tasks``): STS, Classification or Retrieval tasks
  read from a user's files in a documented format (README, *Evaluation*); no code change needed.
  Their dataset path is ``custom/<name>``.
- **Hub tasks** (``"mteb:<task or benchmark>"``): mteb's official tasks by name, e.g.
  ``mteb:STS12`` or ``mteb:MTEB(eng, v2)``; their data comes from the Hub when a task runs.

For local and custom tasks ``dataset["revision"]`` is a content hash of the data files the task
reads (for custom tasks also of the reading and protocol settings), computed when the task object
is built, so any edit gives the task a new revision, recorded in mteb's result files.

mteb takes seconds to import, so task classes are created (and mteb imported) on first use.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import ValidationError

from gist_core.catalogue import (
    DEFAULT_DATA_DIR,
    DEFAULT_MAIN_SCORE,
    HUB_PREFIX,
    LOCAL_TASKS,
    SPECS,
    LabelledTexts,
    LocalTaskSpec,
    check_files,
    read_jsonl_rows,
    read_labelled_split,
    spec_of,
    strict_records,
)
from gist_core.config import CustomClassificationTask, CustomRetrievalTask, CustomSTSTask
from gist_core.errors import DataError, EvaluationError
from gist_core.hashing import labelled_files_digest
from gist_core.readers import first_rows, read_labelled, read_qrels

if TYPE_CHECKING:
    from mteb.abstasks.abstask import AbsTask
    from mteb.abstasks.task_metadata import TaskMetadata

CustomTaskConfig = CustomSTSTask | CustomClassificationTask | CustomRetrievalTask

log = logging.getLogger(__name__)

REVISION_CHARS = 40

_ABSTASK_BASES: dict[str, str] = {
    "STS": "mteb.abstasks.sts:AbsTaskSTS",
    "Classification": "mteb.abstasks.classification:AbsTaskClassification",
    "Retrieval": "mteb.abstasks.retrieval:AbsTaskRetrieval",
}


# ---------------------------------------------------------------- reading task files (gist_core.readers)


def read_sts(
    path: Path,
    file_format: Literal["jsonl", "csv", "tsv"] = "jsonl",
    sentence1: str = "sentence1",
    sentence2: str = "sentence2",
    score: str = "score",
) -> dict[str, list]:
    """STS pairs as columns sentence1, sentence2, score (a float) from JSON lines, CSV or TSV."""
    try:
        if file_format == "jsonl":
            rows: list[dict[str, Any]] = read_jsonl_rows(path)
        else:
            rows = strict_records(path, file_format).to_dict("records")
    except DataError as err:
        raise EvaluationError(str(err)) from None
    columns: dict[str, list] = {"sentence1": [], "sentence2": [], "score": []}
    for i, row in enumerate(rows, start=1):
        try:
            columns["sentence1"].append(str(row[sentence1]))
            columns["sentence2"].append(str(row[sentence2]))
            columns["score"].append(float(row[score]))
        except (KeyError, TypeError, ValueError) as err:
            raise EvaluationError(
                f"{path}: row {i}: needs {sentence1}, {sentence2} and a numeric {score} ({type(err).__name__}: {err})"
            ) from None
    if not rows:
        raise EvaluationError(f"{path}: no sentence pairs")
    return columns


def content_revision(paths: Sequence[Path], root: Path, settings: bytes = b"") -> str:
    """A task's dataset revision: sha256 over its files' bytes, labelled by path relative to ``root``."""
    files = ((path.relative_to(root).as_posix(), path) for path in paths)
    return labelled_files_digest(files, label_end=b"\0", extra=settings)[:REVISION_CHARS]


def _check_files(task: str, paths: Mapping[str, Path]) -> None:
    try:
        check_files(task, paths)
    except DataError as err:
        raise EvaluationError(str(err)) from None


# ---------------------------------------------------------------- datasets in mteb's shapes


def sts_dataset(splits: Mapping[str, dict[str, list]]) -> Any:
    """A DatasetDict of sentence1/sentence2/score columns per split."""
    # deferred: datasets takes a second to import
    from datasets import Dataset, DatasetDict, Features, Value

    features = Features({"sentence1": Value("string"), "sentence2": Value("string"), "score": Value("float64")})
    return DatasetDict({split: Dataset.from_dict(columns, features=features) for split, columns in splits.items()})


def classification_dataset(splits: Mapping[str, LabelledTexts], paths: Mapping[str, Path], train: str = "train") -> Any:
    """A DatasetDict of text/label/label_text per split; every label must occur in the train split."""
    # deferred: datasets takes a second to import
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    train_labels = set(splits[train][1])
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
                {"text": texts, "label": [index[x] for x in labels], "label_text": labels}, features=features
            )
            for split, (texts, labels) in splits.items()
        }
    )


def retrieval_dataset(
    task: str, corpus_path: Path, queries_path: Path, qrels_paths: Mapping[str, Path]
) -> dict[str, Any]:
    """``{split: RetrievalSplitData}`` from BEIR files: corpus and queries JSON lines, a qrels TSV per split."""
    # deferred: datasets and mteb take seconds to import
    from datasets import Dataset
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    try:
        corpus_rows = read_jsonl_rows(corpus_path)
        query_rows = read_jsonl_rows(queries_path)
    except DataError as err:
        raise EvaluationError(str(err)) from None
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
        raise EvaluationError(f"task {task}: BEIR rows need _id and text (missing {err})") from None
    doc_ids = set(corpus["id"])
    data = {}
    for split, path in qrels_paths.items():
        try:
            qrels = read_qrels(path)
        except DataError as err:
            raise EvaluationError(str(err)) from None
        missing = sorted(set(qrels) - set(query_text))
        if missing:
            raise EvaluationError(f"{path}: query ids not in {queries_path}: {missing[:10]}")
        unknown_docs = sorted({d for docs in qrels.values() for d in docs} - doc_ids)
        if unknown_docs:
            raise EvaluationError(f"{path}: corpus ids not in {corpus_path}: {unknown_docs[:10]}")
        # Like mteb's BEIR loader: keep the queries that have judgements, in file order.
        ids = [qid for qid in query_text if qid in qrels]
        queries = Dataset.from_dict({"id": ids, "text": [query_text[q] for q in ids]})
        data[split] = RetrievalSplitData(corpus=corpus, queries=queries, relevant_docs=qrels, top_ranked=None)
    return data


# ---------------------------------------------------------------- task classes over files


def _import(ref: str) -> Any:
    """``module:attr`` imported on use (mteb's task modules take seconds to import)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


class _FileTask:
    """Mixin placed before an mteb AbsTask: metadata and data from files, not the Hub."""

    metadata: TaskMetadata
    dataset: Any
    data_loaded: bool

    def __init__(self, seed: int = 42, **kwargs: Any) -> None:
        # An instance attribute, set before AbsTask.__init__ reads hf_subsets from it.
        self._file_metadata = self._build_metadata()
        self.metadata = self._file_metadata
        super().__init__(seed=seed, **kwargs)

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        log.info("loading task %s from files", self.metadata.name)
        self.dataset = {"default": self._read_dataset()}
        self.data_loaded = True

    def unload_data(self) -> None:
        # Not super(): mteb's version drops the instance's metadata to fall back on the class's
        # (published) one and then reads it. A file task's metadata describes its files.
        if not self.data_loaded:
            log.warning("task %s: data not loaded, nothing to unload", self.metadata.name)
            return
        self.dataset = None
        self.data_loaded = False
        self.metadata = self._file_metadata

    def _build_metadata(self) -> TaskMetadata:
        raise NotImplementedError

    def _read_dataset(self) -> Any:
        raise NotImplementedError


class _LabelList:
    """A Dataset as mteb's undersampling reads it: the label column as one list, the rest delegated.

    With datasets >= 4, ``dataset[column]`` is a lazy ``Column`` that converts one row per index
    access, so mteb's ``labels[i]`` loop over a 27k-row train split took ~9 s per experiment.
    """

    def __init__(self, dataset: Any, column: str) -> None:
        self._dataset = dataset
        self._column = column
        self._labels = list(dataset[column][:])  # one Arrow-to-Python conversion

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, key: Any) -> Any:
        return self._labels if key == self._column else self._dataset[key]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dataset, name)


class _FastClassification:
    """Mixin before mteb's AbsTaskClassification: its protocol unchanged, its label reads vectorised.

    Same samples, same classifier, same scores; only how the label column is read differs (see
    ``_LabelList``). On the pack, TweetSentimentExtraction spent ~3 minutes there, not encoding.
    """

    label_column_name: str

    def _undersample_data(self, dataset: Any, experiment_num: int, idxs: list[int] | None = None) -> Any:
        return super()._undersample_data(_LabelList(dataset, self.label_column_name), experiment_num, idxs)  # type: ignore[misc]

    def _calculate_scores(self, y_test: Any, y_pred: Any) -> Any:
        if not isinstance(y_test, list | tuple) and hasattr(y_test, "column_name"):  # a datasets Column
            y_test = list(y_test[:])  # sklearn would otherwise convert it row by row, once per metric
        return super()._calculate_scores(y_test, y_pred)  # type: ignore[misc]


def _task_bases(kind: str, file_task: type[_FileTask]) -> tuple[type, ...]:
    """The bases of a file task class: our loader mixin, then mteb's abstract task for the type."""
    base = _import(_ABSTASK_BASES[kind])
    return (file_task, _FastClassification, base) if kind == "Classification" else (file_task, base)


# ---------------------------------------------------------------- the local pack


def local_metadata(spec: LocalTaskSpec, data_dir: Path) -> TaskMetadata:
    """The official task's metadata with the local dataset path and the data's content hash."""
    paths = spec.paths(data_dir)
    _check_files(spec.name, paths)
    official = _import(spec.official).metadata
    revision = content_revision(sorted(paths.values()), data_dir)
    note = (
        f"Local offline copy of the MTEB task {official.name}, built from the data folder {spec.folder} "
        "(provenance in data/raw/SOURCES.md); dataset.revision is a sha256 content hash of its files, "
        "not a Hugging Face revision."
    )
    update: dict[str, Any] = {
        "dataset": {"path": f"local/{spec.folder}", "revision": revision},
        "description": f"{official.description.strip()} {note}".strip(),
        "adapted_from": [official.name],
    }
    if spec.license is not None:
        update["license"] = spec.license
    return official.model_copy(update=update, deep=True)  # the published task's metadata stays untouched


class _LocalTask(_FileTask):
    spec: ClassVar[LocalTaskSpec]

    def __init__(self, data_dir: Path | str = DEFAULT_DATA_DIR, seed: int = 42, **kwargs: Any) -> None:
        self.data_dir = Path(data_dir)
        super().__init__(seed=seed, **kwargs)

    def _build_metadata(self) -> TaskMetadata:
        return local_metadata(self.spec, self.data_dir)

    def _read_dataset(self) -> Any:
        spec, paths = self.spec, self.spec.paths(self.data_dir)
        if spec.kind == "STS":
            return sts_dataset({split: read_sts(path) for split, path in paths.items()})
        if spec.kind == "Classification":
            splits = {split: read_labelled_split(spec, path) for split, path in paths.items()}
            return classification_dataset(splits, paths)
        qrels = {split: paths[split] for split in self.metadata.eval_splits}
        return retrieval_dataset(spec.name, paths["corpus"], paths["queries"], qrels)


@functools.cache
def task_class(name: str) -> type[AbsTask]:
    """The local task class for an official task name (created, and mteb imported, on first use).

    It subclasses mteb's abstract task for the task type and copies the official class's public
    class attributes (its protocol: ``samples_per_label``, ``min_score``/``max_score``, ...).
    """
    try:
        spec = spec_of(name)
    except DataError as err:
        raise EvaluationError(str(err)) from None
    official = _import(spec.official)
    base = _import(_ABSTASK_BASES[spec.kind])
    if not issubclass(official, base):
        raise EvaluationError(f"task {name}: {spec.official} is not a {base.__name__}; mteb changed?")
    protocol = {k: v for k, v in vars(official).items() if not k.startswith("_") and k != "metadata"}
    return type(
        name,
        _task_bases(spec.kind, _LocalTask),
        {
            **protocol,
            "spec": spec,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"Local offline copy of MTEB's {name} ({base.__name__}), data in {spec.folder}/.",
        },
    )


def build_task(name: str, data_dir: Path = DEFAULT_DATA_DIR) -> AbsTask:
    """A local task object for ``data_dir``; its metadata (and revision) reflect the files there now."""
    return task_class(name)(data_dir=data_dir)


# ---------------------------------------------------------------- custom tasks from params.yaml

# Config fields naming files, per type (role -> field); the rest of a config is settings.
_FILE_FIELDS: dict[str, tuple[str, ...]] = {
    "STS": ("test",),
    "Classification": ("train", "test"),
    "Retrieval": ("corpus", "queries", "qrels"),
}
# Fields that do not change a score (left out of the revision so editing them keeps cached results).
_DESCRIPTIVE_FIELDS = frozenset({"name", "description", "languages", "license", "citation"})


def custom_paths(config: CustomTaskConfig, root: Path) -> dict[str, Path]:
    """role -> file of a custom task, relative paths resolved against the project root."""
    out = {}
    for role in _FILE_FIELDS[config.type]:
        path = Path(getattr(config, role)).expanduser()
        out[role] = path if path.is_absolute() else root / path
    return out


def custom_metadata(config: CustomTaskConfig, root: Path) -> TaskMetadata:
    """TaskMetadata of a user's task; its revision hashes the files' bytes and the reading settings."""
    # deferred: mteb takes seconds to import
    from mteb.abstasks.task_metadata import TaskMetadata

    paths = custom_paths(config, root)
    _check_files(config.name, paths)
    settings = config.model_dump(mode="json", exclude=_DESCRIPTIVE_FIELDS | set(paths))
    settings["main_score"] = config.main_score or DEFAULT_MAIN_SCORE[config.type]
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    revision = labelled_files_digest(sorted(paths.items()), label_end=b"\0", extra=canonical)[:REVISION_CHARS]
    description = config.description.strip() or (
        f"Custom {config.type} task {config.name} from params.yaml evaluate.custom_tasks."
    )
    try:
        return TaskMetadata(
            name=config.name,
            description=description + " dataset.revision is a sha256 of its files and reading settings.",
            dataset={"path": f"custom/{config.name}", "revision": revision},
            type=config.type,
            category="t2t",
            modalities=["text"],
            eval_splits=["test"],
            eval_langs=list(config.languages),
            main_score=settings["main_score"],
            license=config.license,
            bibtex_citation=config.citation,
        )
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors())
        raise EvaluationError(f"custom task {config.name}: invalid task metadata: {problems}") from None


class _CustomTask(_FileTask):
    config: ClassVar[CustomTaskConfig]
    root: ClassVar[Path]

    def _build_metadata(self) -> TaskMetadata:
        return custom_metadata(self.config, self.root)

    def _read_dataset(self) -> Any:
        config, paths = self.config, custom_paths(self.config, self.root)
        if config.type == "STS":
            columns = read_sts(
                paths["test"], config.format, config.sentence1_column, config.sentence2_column, config.score_column
            )
            return sts_dataset({"test": columns})
        if config.type == "Classification":
            splits = {split: _read_custom_labelled(config, split, path) for split, path in paths.items()}
            return classification_dataset(splits, paths)
        return retrieval_dataset(config.name, paths["corpus"], paths["queries"], {"test": paths["qrels"]})


def _read_custom_labelled(config: CustomClassificationTask, split: str, path: Path) -> LabelledTexts:
    """One split through the same reader and row checks as data.classification; skipped rows are logged."""
    try:
        frame, skipped, _ = read_labelled(
            path,
            config.format,
            config.text_column,
            config.label_column,
            separator=config.separator,
            where=f"evaluate.custom_tasks '{config.name}'",
        )
    except DataError as err:
        raise EvaluationError(f"custom task {config.name} ({split}): {err}") from None
    if skipped:
        log.warning(
            "custom task %s (%s): skipped %d unusable rows of %s (%s)",
            config.name,
            split,
            len(skipped),
            path,
            first_rows(skipped),
        )
    if frame.empty:
        raise EvaluationError(f"custom task {config.name}: no usable rows in {path}")
    return frame["text"].tolist(), frame["label"].tolist()


def build_custom_task(config: CustomTaskConfig, root: Path) -> AbsTask:
    """A task object for one entry of ``evaluate.custom_tasks`` (files resolved against ``root``)."""
    base = _import(_ABSTASK_BASES[config.type])
    protocol: dict[str, Any] = {}
    if config.type == "STS":
        protocol = {"min_score": config.min_score, "max_score": config.max_score}
    elif config.type == "Classification":
        protocol = {"samples_per_label": config.samples_per_label, "n_experiments": config.n_experiments}
    cls = type(
        config.name,
        _task_bases(config.type, _CustomTask),
        {
            **protocol,
            "config": config,
            "root": Path(root),
            "__module__": __name__,
            "__qualname__": config.name,
            "__doc__": f"Custom {config.type} task {config.name} from params.yaml ({base.__name__}).",
        },
    )
    return cls()


# ---------------------------------------------------------------- mteb's official tasks (Hub)


def hub_tasks(ref: str) -> list[AbsTask]:
    """mteb's official task(s) for ``mteb:<task>`` or ``mteb:<benchmark>`` (metadata only; no download yet)."""
    # deferred: mteb takes seconds to import
    import mteb

    name = ref.removeprefix(HUB_PREFIX).strip()
    if not name:
        raise EvaluationError(f"{ref!r}: name an mteb task or benchmark after '{HUB_PREFIX}'")
    try:
        return list(mteb.get_benchmark(name).tasks)
    except (KeyError, ValueError):
        pass
    try:
        return [mteb.get_task(name)]
    except (KeyError, ValueError) as err:
        raise EvaluationError(f"{ref!r}: not an mteb task or benchmark name ({err})") from None


def task_source(task: AbsTask) -> Literal["local", "custom", "hub"]:
    """Where a task's data comes from: the local pack, a user's files, or the Hugging Face Hub."""
    if isinstance(task, _LocalTask):
        return "local"
    if isinstance(task, _CustomTask):
        return "custom"
    return "hub"


def build_tasks(
    names: Sequence[str],
    data_dir: Path = DEFAULT_DATA_DIR,
    *,
    custom_tasks: Sequence[CustomTaskConfig] = (),
    root: Path | None = None,
) -> list[AbsTask]:
    """Task objects for ``evaluate.tasks`` entries, in order; duplicate task names are an error.

    An entry is a local task (``LOCAL_TASKS``, data in ``data_dir``), the name of one of
    ``custom_tasks`` (files relative to ``root``, default the working directory), or
    ``mteb:<task or benchmark>`` (mteb's official tasks; a benchmark expands to its tasks).
    """
    custom = {c.name: c for c in custom_tasks}
    tasks: list[AbsTask] = []
    for name in names:
        if name.startswith(HUB_PREFIX):
            tasks.extend(hub_tasks(name))
        elif name in custom:
            tasks.append(build_custom_task(custom[name], root if root is not None else Path.cwd()))
        elif name in SPECS:
            tasks.append(build_task(name, data_dir))
        else:
            known = ", ".join([*LOCAL_TASKS, *custom])
            raise EvaluationError(
                f"unknown task {name!r}; local and custom tasks: {known}; or '{HUB_PREFIX}<mteb task or benchmark>'"
            )
    built = [t.metadata.name for t in tasks]
    dupes = sorted({n for n in built if built.count(n) > 1})
    if dupes:
        raise EvaluationError(f"duplicate task names: {dupes}")
    return tasks
