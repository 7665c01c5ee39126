"""Score models on MTEB tasks with a result cache.

``evaluate_model`` runs ``mteb.evaluate`` with a ``ResultCache``: mteb stores each task's result as
``<cache_dir>/results/<model_name with / -> __>/<model_revision>/<Task>.json``. The revision is
the caller's content hash of the weights plus what else changes a score (``cache_revision``: the
sequence length, the precision and the sentence-transformers / transformers / torch versions), so
two checkpoints never share results, a score computed under other libraries is never reused, and
a second call for the same checkpoint reads them back without encoding. A cached result is reused only if
it was computed on the task's current data revision with the running mteb version; otherwise the
task is run again (mteb's own "only-missing" strategy would keep a stale result). While a task
runs, each distinct text is encoded once (``gist_core.evaluation.encoding.DedupEncoder``).

mteb and sentence-transformers take seconds to import: they are imported where a model is scored.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import PrivateAttr

from gist_core.catalogue import HUB_PREFIX, LOCAL_TASKS
from gist_core.errors import EvaluationError
from gist_core.evaluation.summary import TaskScore
from gist_core.evaluation.tasks import task_source
from gist_core.hashing import json_digest
from gist_core.models import ModelRef, load_sentence_transformer, model_fingerprint, runtime_libraries

if TYPE_CHECKING:
    from mteb.abstasks.abstask import AbsTask
    from mteb.results import TaskResult
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

# The result cache's model name for every local folder: a model is its weights (the revision, a
# content hash), not its path or role, so a candidate that later becomes the champion keeps its results.
LOCAL_MODEL_NAME = "gist-local/model"


def evaluate_model(
    model: SentenceTransformer,
    *,
    model_name: str,
    model_revision: str,
    tasks: Sequence[AbsTask],
    cache_dir: Path,
    batch_size: int = 64,
    show_progress_bar: bool = True,
    deduplicate: bool = True,
    precision: Literal["float32", "bfloat16"] = "float32",
) -> dict[str, TaskScore]:
    """Score ``model`` on ``tasks`` with mteb; results are cached under (model_name, model_revision).

    Args:
        model: the SentenceTransformer to encode with (its own ``max_seq_length`` applies).
        model_name: ``org/name`` (mteb requires the slash), e.g. ``gist-local/model``.
        model_revision: a content hash of the weights (``gist_core.models.model_fingerprint``); it
            names the cache folder, so it must be a single path component. It is the whole cache
            key besides the name: a setting changed after loading (e.g. ``max_seq_length``) that
            should not share results must be folded into it.
        tasks: mteb task objects, e.g. from ``gist_core.evaluation.tasks.build_tasks``.
        cache_dir: the ResultCache folder.
        batch_size: texts per forward pass.
        show_progress_bar: mteb's and sentence-transformers' progress bars.
        deduplicate: encode each distinct text of a task once (False: as mteb asks, for benchmarks).
        precision: ``bfloat16`` encodes under bf16 autocast (faster on CPUs with AMX; scores shift
            slightly), so ``model_revision`` must differ from the float32 one (``score_model`` adds "-bf16").

    Returns:
        ``{task name: TaskScore}`` in the order of ``tasks``, read from the cached result files
        (mteb rounds scores to 6 decimals there), so a fresh and a cached run agree exactly.

    Raises:
        EvaluationError: a bad name or revision, duplicate tasks, a task whose data cannot be
            loaded (for a Hub task, the message says so and points at the offline task pack), or a
            task that fails in mteb.
    """
    _check_model_identity(model_name, model_revision)
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be at least 1, got {batch_size}")
    names = [task.metadata.name for task in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EvaluationError(f"duplicate tasks: {dupes}")

    # deferred: mteb takes seconds to import (the encoder module imports it too)
    import mteb
    from mteb.cache import ResultCache

    from gist_core.evaluation.encoding import DedupEncoder

    cache = ResultCache(cache_dir)
    encoder = DedupEncoder(
        model, name=model_name, revision=model_revision, deduplicate=deduplicate, precision=precision
    )
    scores: dict[str, TaskScore] = {}
    for task in tasks:
        name = task.metadata.name
        cached = cache.load_task_result(name, model_name, model_revision)
        stale = _stale_reasons(cached, task, mteb.__version__) if cached is not None else []
        if stale:
            log.info("%s: cached result is stale (%s); evaluating again", name, "; ".join(stale))
        from_cache = cached is not None and not stale and not cached.get_missing_evaluations(task)
        loaded_here = not from_cache and not task.data_loaded
        if loaded_here:
            _load_task_data(task)
        try:
            model_result = mteb.evaluate(
                encoder,
                tasks=[task],
                cache=cache,
                # mteb's "only-missing" would also serve a stale result: recompute those.
                overwrite_strategy="always" if stale else "only-missing",
                encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress_bar},
                # codecarbon (when installed) may look up location and hardware data online.
                co2_tracker=False,
                show_progress_bar=show_progress_bar,
            )
        except Exception as err:  # noqa: BLE001 - any mteb failure becomes one clear line
            raise EvaluationError(f"task {name}: evaluation failed: {type(err).__name__}: {err}") from err
        finally:
            if loaded_here and task.data_loaded:
                task.unload_data()
            stats = encoder.reset()
        if model_result.exceptions or len(model_result.task_results) != 1:
            raise EvaluationError(f"task {name}: evaluation failed: {model_result.exceptions}")
        # Read the result back from the cache: mteb rounds scores when it writes them, so a
        # fresh run and a cached one give the same numbers only if both come from the file.
        stored = cache.load_task_result(name, model_name, model_revision)
        if stored is None:
            path = cache.get_task_result_path(name, model_name, model_revision)
            raise EvaluationError(f"task {name}: mteb did not store its result at {path}")
        scores[name] = _task_score(task, stored, None if from_cache else stats.to_dict())
        log.info(
            "%s: %s=%.4f for %s@%s (%s)",
            name,
            scores[name].main_score_name,
            scores[name].main_score,
            model_name,
            model_revision,
            "from the cache" if from_cache else f"evaluated; {stats.encoded} of {stats.texts} texts encoded",
        )
    return scores


def evaluation_settings(max_seq_length: int | None, precision: str) -> dict[str, str]:
    """What a score depends on besides the weights, the task data and mteb (the gate's ``comparable`` rule)."""
    return {
        "precision": precision,
        "max_seq_length": "model" if max_seq_length is None else str(max_seq_length),
        "libraries": runtime_libraries(),
    }


def cache_revision(fingerprint: str, settings: dict[str, str]) -> str:
    """The result cache's revision: ``<fingerprint>[-len<N>][-bf16]-lib<hash of the library versions>``."""
    revision = fingerprint
    if settings["max_seq_length"] != "model":
        revision += f"-len{settings['max_seq_length']}"
    if settings["precision"] != "float32":
        revision += "-bf16"
    return f"{revision}-lib{json_digest(settings['libraries'])[:12]}"


@dataclass(frozen=True)
class ScoredModel:
    """A model's scores and the identity they are cached under."""

    ref: str  # as configured: a short name, a folder, a Hub id
    name: str  # the result cache's model name
    revision: str  # ``cache_revision``: the content hash of the model's files + settings that change scores
    scores: dict[str, TaskScore]
    fingerprint: str = ""  # ``model_fingerprint`` of the model alone
    settings: dict[str, str] = field(default_factory=dict)  # ``evaluation_settings``

    def identity(self) -> dict[str, str]:
        return {"ref": self.ref, "name": self.name, "revision": self.revision, "fingerprint": self.fingerprint}


def score_model(
    ref: ModelRef,
    tasks: Sequence[AbsTask],
    *,
    cache_dir: Path,
    batch_size: int = 64,
    max_seq_length: int | None = None,
    show_progress_bar: bool = True,
    precision: Literal["float32", "bfloat16"] = "float32",
) -> ScoredModel:
    """Load a model and score it on ``tasks`` through the result cache, keyed by its content hash.

    Local folders are cached as ``LOCAL_MODEL_NAME``, a Hub model under its id, at
    ``model_fingerprint(ref)`` (the content hash of the folder or of the Hub snapshot).
    ``max_seq_length`` None keeps the model's own (256 for all-MiniLM-L6-v2, as in its published
    MTEB scores). Settings that change scores are folded into the revision (``cache_revision``):
    ``-len<N>`` for a length override, ``-bf16`` for bfloat16, ``-lib<hash>`` for the versions of
    sentence-transformers, transformers and torch.
    """
    model = load_sentence_transformer(ref, max_seq_length)
    name = LOCAL_MODEL_NAME if ref.is_local else ref.location
    fingerprint = model_fingerprint(ref)
    settings = evaluation_settings(max_seq_length, precision)
    revision = cache_revision(fingerprint, settings)
    scores = evaluate_model(
        model,
        model_name=name,
        model_revision=revision,
        tasks=tasks,
        cache_dir=cache_dir,
        batch_size=batch_size,
        show_progress_bar=show_progress_bar,
        precision=precision,
    )
    return ScoredModel(ref.ref, name, revision, scores, fingerprint, settings)


def cached_results(cache_dir: Path, identity: dict[str, str], tasks: Sequence[AbsTask]) -> list[TaskResult]:
    """The stored mteb results of a scored model (``ScoredModel.identity()``) on ``tasks``, as TaskResult objects.

    Each result answers ``.task`` with the task object given here: mteb would look the task up by
    name in its own registry, which knows neither the local copies' data revisions nor custom
    tasks. So mteb's helpers (e.g. the Hugging Face results metadata of a model card) describe the
    data that was really evaluated. Tasks without a stored result are left out.
    """
    # deferred: mteb takes seconds to import
    from mteb.cache import ResultCache

    cache = ResultCache(cache_dir)
    out = []
    for task in tasks:
        stored = cache.load_task_result(task.metadata.name, identity["name"], identity["revision"])
        if stored is not None:
            out.append(_bound_result(stored, task))
    return out


def _bound_result(result: TaskResult, task: AbsTask) -> TaskResult:
    bound = _bound_result_class().model_construct(**{k: getattr(result, k) for k in type(result).model_fields})
    bound._task = task
    return bound


@functools.cache
def _bound_result_class() -> type:
    # deferred: mteb takes seconds to import
    from mteb.results import TaskResult

    class BoundTaskResult(TaskResult):
        """A TaskResult that knows its task object (``cached_results``)."""

        _task: Any = PrivateAttr(default=None)

        @property
        def task(self) -> AbsTask:
            return self._task

    return BoundTaskResult


def _load_task_data(task: AbsTask) -> None:
    """Load a task's data before mteb runs it, so a failure names the task and what to do."""
    name = task.metadata.name
    try:
        task.load_data()
    except EvaluationError:
        raise
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one clear line
        if task_source(task) != "hub":
            raise EvaluationError(f"task {name}: could not load its data: {type(err).__name__}: {err}") from err
        # deferred: huggingface_hub is only needed to explain a Hub failure
        from huggingface_hub import constants

        dataset = task.metadata.dataset
        where = f"{dataset.get('path')}@{dataset.get('revision')}"
        offline = (
            " HF_HUB_OFFLINE is set and the data is not in the local Hugging Face cache."
            if constants.HF_HUB_OFFLINE
            else " Is the Hugging Face Hub reachable?"
        )
        local = f" (the pack has a local copy of this task: use '{name}' instead of '{HUB_PREFIX}{name}')"
        raise EvaluationError(
            f"task {name} ({HUB_PREFIX}): could not load its data from the Hugging Face Hub ({where}): "
            f"{type(err).__name__}: {err}.{offline} Offline, use the local task pack in evaluate.tasks: "
            f"{', '.join(LOCAL_TASKS)}{local if name in LOCAL_TASKS else ''}, or evaluate.custom_tasks."
        ) from err


def _check_model_identity(model_name: str, model_revision: str) -> None:
    if "/" not in model_name or model_name.startswith("/") or model_name.endswith("/"):
        raise EvaluationError(f"model_name must look like 'org/name' (mteb's format), got {model_name!r}")
    if not model_revision or any(c in model_revision for c in "/\\") or model_revision in {".", ".."}:
        raise EvaluationError(f"model_revision must be a non-empty single path component, got {model_revision!r}")


def _stale_reasons(cached: TaskResult, task: AbsTask, mteb_version: str) -> list[str]:
    """Why a cached result may not be reused: other task data, or another mteb version."""
    reasons = []
    if cached.dataset_revision != task.metadata.revision:
        reasons.append(f"dataset revision {cached.dataset_revision} != {task.metadata.revision}")
    if cached.mteb_version != mteb_version:
        reasons.append(f"mteb {cached.mteb_version} != {mteb_version}")
    return reasons


def _task_score(task: AbsTask, result: TaskResult, encoding: dict[str, float] | None) -> TaskScore:
    metadata = task.metadata
    if result.dataset_revision != metadata.revision:  # guards the cache logic above
        raise EvaluationError(
            f"task {metadata.name}: result is for dataset revision {result.dataset_revision}, "
            f"the task's data is {metadata.revision}"
        )
    main_score = float(result.get_score(splits=list(task.eval_splits)))
    return TaskScore(
        task=metadata.name,
        main_score_name=metadata.main_score,
        main_score=main_score,
        category=str(metadata.type),
        task_revision=result.dataset_revision,
        mteb_version=str(result.mteb_version),
        evaluation_time=result.evaluation_time,
        encoding=encoding,
    )
