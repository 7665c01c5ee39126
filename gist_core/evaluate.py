"""Evaluate models on MTEB tasks with a result cache, and compare a candidate with its baselines.

``evaluate_model`` runs ``mteb.evaluate`` with a ``ResultCache``: mteb stores each task's result as
``<cache_dir>/results/<model_name with / -> __>/<model_revision>/<Task>.json``. The revision is
the caller's content hash of the weights, so two checkpoints never share results and a second
call for the same checkpoint reads them back without encoding. A cached result is reused only if
it was computed on the task's current data revision with the running mteb version; otherwise the
task is run again (mteb's own "only-missing" strategy would keep a stale result). While a task
runs, each distinct text is encoded once (``gist_core.encoding.DedupEncoder``).

The rest is pure: ``summarize`` gives per-task scores, per-category means and overall means with
deltas against each baseline (the base model, the current champion); ``summary_metrics``,
``summary_markdown`` and ``plot_deltas`` turn a summary into MLflow metrics, a Markdown table and
a bar chart.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Any, Literal

from gist_core.errors import EvaluationError

if TYPE_CHECKING:
    from mteb.abstasks.abstask import AbsTask
    from mteb.results import TaskResult
    from sentence_transformers import SentenceTransformer

    from gist_core.models import ModelRef

log = logging.getLogger(__name__)

# The result cache's model name for every local folder: a model is its weights (the revision, a
# content hash), not its path or role, so a candidate that later becomes the champion keeps its results.
LOCAL_MODEL_NAME = "gist-local/model"

OVERALL = "overall"  # mean over tasks (MTEB's "Mean (Task)")
OVERALL_BY_CATEGORY = "overall_by_category"  # mean of the category means (MTEB's "Mean (TaskType)")


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
    # For a task encoded in this call: {"texts", "encoded", "seconds"}; None when served from the cache.
    encoding: dict[str, float] | None = field(default=None, compare=False)


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
        model_revision: a content hash of the weights (e.g. ``gist_core.models.fingerprint``); it
            names the cache folder, so it must be a single path component. It is the whole cache
            key besides the name: a setting changed after loading (e.g. ``max_seq_length``) that
            should not share results must be folded into it.
        tasks: mteb task objects, e.g. from ``gist_core.tasks.build_tasks``.
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

    import mteb
    from mteb.cache import ResultCache

    from gist_core.encoding import DedupEncoder

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


@dataclass(frozen=True)
class ScoredModel:
    """A model's scores and the identity they are cached under."""

    ref: str  # as configured: a short name, a folder, a Hub id
    name: str  # the result cache's model name
    revision: str  # a content hash of the model's files (+ "-len<N>", "-bf16" for non-default settings)
    scores: dict[str, TaskScore]

    def identity(self) -> dict[str, str]:
        return {"ref": self.ref, "name": self.name, "revision": self.revision}


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

    Local folders are cached as ``LOCAL_MODEL_NAME`` at ``fingerprint(folder)``; a Hub model under
    its id at the fingerprint of its downloaded snapshot. ``max_seq_length`` None keeps the
    model's own (256 for all-MiniLM-L6-v2, as in its published MTEB scores). Settings that change
    scores are folded into the revision: ``-len<N>`` for a length override, ``-bf16`` for bfloat16.
    """
    from gist_core.models import fingerprint, load_sentence_transformer

    model = load_sentence_transformer(ref, max_seq_length)
    if ref.is_local:
        name, revision = LOCAL_MODEL_NAME, fingerprint(Path(ref.location))
    else:
        name, revision = ref.location, _hub_revision(ref.location)
    if max_seq_length is not None:
        revision += f"-len{max_seq_length}"
    if precision != "float32":
        revision += "-bf16"
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
    return ScoredModel(ref.ref, name, revision, scores)


def _hub_revision(hub_id: str) -> str:
    """The fingerprint of a Hub model's local snapshot (downloaded when it was loaded)."""
    from huggingface_hub import snapshot_download

    from gist_core.models import fingerprint

    try:
        return fingerprint(Path(snapshot_download(hub_id, local_files_only=True)))
    except Exception as err:  # noqa: BLE001 - keep evaluating, but say the cache key is weaker
        log.warning("%s: no local snapshot to fingerprint (%s); caching its results by its id only", hub_id, err)
        return "hub-" + hub_id.replace("/", "__")


def _load_task_data(task: AbsTask) -> None:
    """Load a task's data before mteb runs it, so a failure names the task and what to do."""
    from gist_core.tasks import HUB_PREFIX, LOCAL_TASKS, task_source

    name = task.metadata.name
    try:
        task.load_data()
    except EvaluationError:
        raise
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one clear line
        if task_source(task) != "hub":
            raise EvaluationError(f"task {name}: could not load its data: {type(err).__name__}: {err}") from err
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


# ---------------------------------------------------------------- comparison: pure


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


def summarize(candidate: dict[str, TaskScore], baselines: Mapping[str, dict[str, TaskScore]]) -> dict[str, Any]:
    """A JSON-able comparison of the candidate with each baseline: per task, per category and overall.

    Args:
        candidate: the candidate's scores.
        baselines: ``{baseline name: scores}``, e.g. ``{"base": ..., "champion": ...}``, in display order.

    Returns:
        ``{"baselines": [names],
        "tasks": {task: {category, main_score_name, candidate, baselines: {name: score}, deltas: {name: delta}}},
        "categories": {category: {tasks, candidate, baselines, deltas}},
        "overall": {tasks, candidate, baselines, deltas},
        "overall_by_category": {categories, candidate, baselines, deltas}}``.
        Categories are TaskMetadata types (STS, Classification, Retrieval, Clustering, ...). A
        category's and ``overall``'s values are unweighted means over their tasks (MTEB's "Mean
        (Task)"); ``overall_by_category`` is the mean of the category means (MTEB's "Mean
        (TaskType)"). Each delta is candidate minus that baseline.

    Raises:
        EvaluationError: no baseline, no tasks, different task sets, or a task whose scores are not
            comparable (different main score, category, dataset revision or mteb version).
    """
    if not baselines:
        raise EvaluationError("nothing to compare with: no baseline scores")
    if not candidate:
        raise EvaluationError("nothing to compare: no tasks were scored")
    deltas = {name: compute_deltas(scores_to_metrics(candidate), scores_to_metrics(b)) for name, b in baselines.items()}
    for name, baseline in baselines.items():
        for task in candidate:
            _check_comparable(candidate[task], baseline[task], name)

    tasks = {
        task: {
            "category": score.category,
            "main_score_name": score.main_score_name,
            "candidate": score.main_score,
            "baselines": {name: baseline[task].main_score for name, baseline in baselines.items()},
            "deltas": {name: deltas[name][task] for name in baselines},
        }
        for task, score in candidate.items()
    }
    by_category: dict[str, list[str]] = {}
    for task, row in tasks.items():
        by_category.setdefault(row["category"], []).append(task)
    categories = {category: _means(tasks, names, "tasks") for category, names in sorted(by_category.items())}
    return {
        "baselines": list(baselines),
        "tasks": tasks,
        "categories": categories,
        OVERALL: _means(tasks, list(tasks), "tasks"),
        OVERALL_BY_CATEGORY: _means(categories, list(categories), "categories"),
    }


def _check_comparable(candidate: TaskScore, baseline: TaskScore, baseline_name: str) -> None:
    fields = ("main_score_name", "category", "task_revision", "mteb_version")
    differ = [
        f"{f} {getattr(candidate, f)!r} vs {getattr(baseline, f)!r}"
        for f in fields
        if getattr(candidate, f) != getattr(baseline, f)
    ]
    if differ:
        raise EvaluationError(
            f"task {candidate.task}: candidate and {baseline_name} are not comparable: {'; '.join(differ)}"
        )
    for score in (candidate, baseline):
        if not math.isfinite(score.main_score):
            raise EvaluationError(f"task {score.task}: main score is {score.main_score}")


def _means(rows: dict[str, dict[str, Any]], names: list[str], label: str) -> dict[str, Any]:
    """Unweighted means of ``candidate``, each baseline and each delta over ``rows[names]``."""
    first = rows[names[0]]
    return {
        label: names,
        "candidate": fmean(rows[n]["candidate"] for n in names),
        "baselines": {b: fmean(rows[n]["baselines"][b] for n in names) for b in first["baselines"]},
        "deltas": {b: fmean(rows[n]["deltas"][b] for n in names) for b in first["deltas"]},
    }


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, name, values) for every line of a summary: tasks, then categories, then the overall means."""
    rows = [("task", task, values) for task, values in summary["tasks"].items()]
    rows += [("category", category, values) for category, values in summary["categories"].items()]
    rows += [(OVERALL, OVERALL, summary[OVERALL]), (OVERALL, OVERALL_BY_CATEGORY, summary[OVERALL_BY_CATEGORY])]
    return rows


def summary_metrics(summary: dict[str, Any], candidate_prefix: str = "eval") -> dict[str, float]:
    """Flat MLflow metrics: scores per task, per category and overall, for the candidate and each baseline.

    Keys: ``eval/<task>``, ``eval/category/<category>``, ``eval/overall``,
    ``eval/overall_by_category``; the same under ``<baseline>/`` (``base/``, ``champion/``); deltas
    against the first baseline under ``delta/`` and against any other under ``delta_<baseline>/``.
    """
    metrics: dict[str, float] = {}
    first = summary["baselines"][0]
    for kind, name, values in summary_rows(summary):
        key = f"category/{name}" if kind == "category" else name
        metrics[f"{candidate_prefix}/{key}"] = values["candidate"]
        for baseline, score in values["baselines"].items():
            metrics[f"{baseline}/{key}"] = score
        for baseline, delta in values["deltas"].items():
            metrics[f"delta/{key}" if baseline == first else f"delta_{baseline}/{key}"] = delta
    return metrics


def summary_markdown(summary: dict[str, Any], title: str = "Evaluation") -> str:
    """A Markdown table: one row per task, per category mean and overall mean; scores on mteb's 0-1 scale."""
    baselines = summary["baselines"]
    header = ["task", "type", "main score", "candidate"]
    for name in baselines:
        header += [name, f"Δ {name}"]
    lines = [
        f"## {title}",
        "",
        "Scores on mteb's 0-1 scale (0.01 = one point); Δ = candidate minus baseline.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (1 + 2 * len(baselines))) + "|",
    ]
    for kind, name, values in summary_rows(summary):
        if kind == "task":
            label, category, score_name = name, values["category"], values["main_score_name"]
        elif kind == "category":
            n = len(values["tasks"])
            label, category, score_name = f"**{name} mean** ({n} task{'s' if n != 1 else ''})", name, ""
        elif name == OVERALL:
            label, category, score_name = f"**mean over tasks** ({len(values['tasks'])})", "all", ""
        else:
            label, category, score_name = f"**mean over types** ({len(values['categories'])})", "all", ""
        cells = [label, category, score_name, f"{values['candidate']:.4f}"]
        for baseline in baselines:
            cells += [f"{values['baselines'][baseline]:.4f}", f"{values['deltas'][baseline]:+.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_deltas(summary: dict[str, Any], path: Path, title: str = "Candidate minus baselines") -> Path:
    """A horizontal bar chart (PNG) of the deltas per task, category mean and overall, one bar per baseline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend or state
    from matplotlib.figure import Figure

    rows = summary_rows(summary)
    overall_labels = {OVERALL: "mean over tasks", OVERALL_BY_CATEGORY: "mean over types"}
    labels = [
        name if kind == "task" else (f"{name} (mean)" if kind == "category" else overall_labels[name])
        for kind, name, _ in rows
    ]
    baselines = summary["baselines"]
    height = 0.8 / len(baselines)
    figure = Figure(figsize=(8, 1.2 + 0.45 * len(rows) * max(1, len(baselines) * 0.7)), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, baseline in enumerate(baselines):
        positions = [r + (i - (len(baselines) - 1) / 2) * height for r in range(len(rows))]
        values = [100 * values["deltas"][baseline] for _, _, values in rows]
        bars = axes.barh(positions, values, height=height, label=f"vs {baseline}")
        axes.bar_label(bars, labels=[f"{v:+.2f}" for v in values], padding=3, fontsize=8)
    axes.set_yticks(range(len(rows)), labels)
    axes.invert_yaxis()  # tasks first, from the top
    for r in range(1, len(rows)):
        if rows[r][0] != rows[r - 1][0]:  # between tasks, category means and overall means
            axes.axhline(r - 0.5, color="grey", linewidth=0.6, linestyle=":")
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_xlabel("delta in MTEB points (candidate minus baseline; 1 point = 0.01)")
    axes.set_title(title)
    axes.margins(x=0.25)
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
