"""Evaluate a model on MTEB tasks with a result cache, and compare a candidate with a baseline.

``evaluate_model`` runs ``mteb.evaluate`` with a ``ResultCache``: mteb stores each task's result as
``<cache_dir>/results/<model_name with / -> __>/<model_revision>/<Task>.json``. The revision is
the caller's content hash of the weights, so two checkpoints never share results and a second
call for the same checkpoint reads them back without encoding. A cached result is reused only if
it was computed on the task's current data revision with the running mteb version; otherwise the
task is run again (mteb's own "only-missing" strategy would keep a stale result).

``summarize`` is pure: per-task scores, per-category means and overall means with deltas.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gist_core.errors import EvaluationError

if TYPE_CHECKING:
    from mteb.abstasks.abstask import AbsTask
    from mteb.results import TaskResult
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskScore:
    """One task's result: mteb's main score (0-1 scale, as mteb reports it) and what it was computed on."""

    task: str
    main_score_name: str
    main_score: float
    category: str  # the TaskMetadata.type: "STS", "Classification", "Retrieval", ...
    task_revision: str  # the task's dataset revision (for local tasks: a content hash of its files)
    mteb_version: str
    evaluation_time: float | None


def evaluate_model(
    model: SentenceTransformer,
    *,
    model_name: str,
    model_revision: str,
    tasks: Sequence[AbsTask],
    cache_dir: Path,
    batch_size: int = 64,
    show_progress_bar: bool = True,
) -> dict[str, TaskScore]:
    """Score ``model`` on ``tasks`` with mteb; results are cached under (model_name, model_revision).

    Args:
        model: the SentenceTransformer to encode with. Its ``model_card_data.model_name`` and
            ``base_model_revision`` (which mteb reads as the model's name and revision) are set for
            the run and restored afterwards.
        model_name: ``org/name`` (mteb requires the slash), e.g. ``local/gist-candidate``.
        model_revision: a content hash of the weights (e.g. ``gist_core.models.fingerprint``); it
            names the cache folder, so it must be a single path component. It is the whole cache
            key besides the name: a setting changed after loading (e.g. ``max_seq_length``) that
            should not share results must be folded into it.
        tasks: mteb task objects, e.g. from ``gist_core.tasks.build_tasks``.
        cache_dir: the ResultCache folder.

    Returns:
        ``{task name: TaskScore}`` in the order of ``tasks``, read from the cached result files
        (mteb rounds scores to 6 decimals there), so a fresh and a cached run agree exactly.

    Raises:
        EvaluationError: a bad name or revision, duplicate tasks, or a task that fails in mteb.
    """
    _check_model_identity(model_name, model_revision)
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be at least 1, got {batch_size}")
    names = [task.metadata.name for task in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EvaluationError(f"duplicate tasks: {dupes}")

    import mteb
    from mteb.cache import ResultCache

    cache = ResultCache(cache_dir)
    card = model.model_card_data
    saved = (card.model_name, card.base_model_revision)
    card.model_name, card.base_model_revision = model_name, model_revision
    try:
        scores: dict[str, TaskScore] = {}
        for task in tasks:
            name = task.metadata.name
            cached = cache.load_task_result(name, model_name, model_revision)
            stale = _stale_reasons(cached, task, mteb.__version__) if cached is not None else []
            if stale:
                log.info("%s: cached result is stale (%s); evaluating again", name, "; ".join(stale))
            from_cache = cached is not None and not stale and not cached.get_missing_evaluations(task)
            try:
                model_result = mteb.evaluate(
                    model,
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
            if model_result.exceptions or len(model_result.task_results) != 1:
                raise EvaluationError(f"task {name}: evaluation failed: {model_result.exceptions}")
            # Read the result back from the cache: mteb rounds scores when it writes them, so a
            # fresh run and a cached one give the same numbers only if both come from the file.
            stored = cache.load_task_result(name, model_name, model_revision)
            if stored is None:
                path = cache.get_task_result_path(name, model_name, model_revision)
                raise EvaluationError(f"task {name}: mteb did not store its result at {path}")
            scores[name] = _task_score(task, stored)
            log.info(
                "%s: %s=%.4f for %s@%s (%s)",
                name,
                scores[name].main_score_name,
                scores[name].main_score,
                model_name,
                model_revision,
                "from the cache" if from_cache else "evaluated",
            )
    finally:
        card.model_name, card.base_model_revision = saved
    return scores


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


def _task_score(task: AbsTask, result: TaskResult) -> TaskScore:
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
    )


def scores_to_metrics(scores: dict[str, TaskScore]) -> dict[str, float]:
    """``{task: main score}``."""
    return {task: score.main_score for task, score in scores.items()}


def compute_deltas(candidate: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """``candidate - baseline`` per task, in the candidate's task order; the task sets must match."""
    only_candidate = sorted(set(candidate) - set(baseline))
    only_baseline = sorted(set(baseline) - set(candidate))
    if only_candidate or only_baseline:
        raise EvaluationError(
            "candidate and baseline were scored on different tasks: "
            f"only candidate {only_candidate}, only baseline {only_baseline}"
        )
    return {task: candidate[task] - baseline[task] for task in candidate}


def summarize(candidate: dict[str, TaskScore], baseline: dict[str, TaskScore]) -> dict[str, Any]:
    """A JSON-able comparison: per task, per category (TaskMetadata.type) and overall.

    ``{"tasks": {task: {category, main_score_name, candidate, baseline, delta}},
    "categories": {category: {tasks, candidate, baseline, delta}},
    "overall": {tasks, candidate, baseline, delta}}``. Category and overall values are
    unweighted means over tasks; ``delta`` is the mean of the per-task deltas.

    Raises:
        EvaluationError: the task sets differ, there are no tasks, or a task's scores are not
            comparable (different main score, category, dataset revision or mteb version).
    """
    deltas = compute_deltas(scores_to_metrics(candidate), scores_to_metrics(baseline))
    if not deltas:
        raise EvaluationError("nothing to compare: no tasks were scored")
    for task in deltas:
        _check_comparable(candidate[task], baseline[task])

    tasks = {
        task: {
            "category": candidate[task].category,
            "main_score_name": candidate[task].main_score_name,
            "candidate": candidate[task].main_score,
            "baseline": baseline[task].main_score,
            "delta": delta,
        }
        for task, delta in deltas.items()
    }
    by_category: dict[str, list[str]] = {}
    for task, row in tasks.items():
        by_category.setdefault(row["category"], []).append(task)
    return {
        "tasks": tasks,
        "categories": {category: _means(tasks, names) for category, names in sorted(by_category.items())},
        "overall": _means(tasks, list(tasks)),
    }


def _check_comparable(candidate: TaskScore, baseline: TaskScore) -> None:
    fields = ("main_score_name", "category", "task_revision", "mteb_version")
    differ = [
        f"{f} {getattr(candidate, f)!r} vs {getattr(baseline, f)!r}"
        for f in fields
        if getattr(candidate, f) != getattr(baseline, f)
    ]
    if differ:
        raise EvaluationError(f"task {candidate.task}: candidate and baseline are not comparable: {'; '.join(differ)}")
    for score in (candidate, baseline):
        if not math.isfinite(score.main_score):
            raise EvaluationError(f"task {score.task}: main score is {score.main_score}")


def _means(tasks: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    def mean(key: str) -> float:
        return sum(tasks[name][key] for name in names) / len(names)

    return {
        "tasks": names,
        "candidate": mean("candidate"),
        "baseline": mean("baseline"),
        "delta": mean("delta"),
    }
