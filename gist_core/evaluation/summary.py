"""Comparing a candidate with its baselines: per task, per category and overall, with deltas. Pure.

``summarize`` gives per-task scores, per-category means and overall means with deltas against each
baseline (the base model, the current champion); ``summary_metrics``, ``summary_markdown`` and
``plot_deltas`` turn a summary into MLflow metrics, a Markdown table and a bar chart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

from gist_core.errors import EvaluationError
from gist_core.tables import markdown_table

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
    rows = []
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
        rows.append(cells)
    lines = [f"## {title}", "", "Scores on mteb's 0-1 scale (0.01 = one point); Δ = candidate minus baseline.", ""]
    lines += markdown_table(header, rows, align=["left"] * 3 + ["right"] * (1 + 2 * len(baselines)))
    return "\n".join(lines) + "\n"


def plot_deltas(summary: dict[str, Any], path: Path, title: str = "Candidate minus baselines") -> Path:
    """A horizontal bar chart (PNG) of the deltas per task, category mean and overall, one bar per baseline."""
    # deferred: matplotlib takes a second to import; no pyplot: no global backend or state
    from matplotlib.backends.backend_agg import FigureCanvasAgg
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
