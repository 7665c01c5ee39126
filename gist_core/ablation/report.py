"""The ablation's report: mean and spread over seeds per arm and noise level, verdicts, masking, a chart.

A difference between two arms counts as a win or a loss only when it is larger than the spread
across seeds (the larger of the two arms' standard deviations); otherwise it is a tie.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gist_core.ablation.plan import OVERALL, RunRecord, output_dir
from gist_core.config import Settings
from gist_core.tables import markdown_table


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def verdict(a: dict[str, float], b: dict[str, float]) -> str:
    """``win`` / ``loss`` when the difference of means exceeds the larger spread, else ``tie``.

    With a single value on both sides there is no spread to compare against: ``no spread``.
    """
    if a["n"] < 2 and b["n"] < 2:
        return "no spread"
    diff = a["mean"] - b["mean"]
    spread = max(a["std"], b["std"])
    if abs(diff) <= spread:
        return "tie"
    return "win" if diff > 0 else "loss"


def summarize(
    records: Sequence[RunRecord],
    settings: Settings,
    data: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Mean and spread per arm, noise level and metric (task, task type, overall), verdicts and masking rates.

    A base arm's single score stands for every noise level (it does not train). Per seed, a task
    type's score is the mean of its tasks and the overall score the mean of all tasks; means and
    spreads are then taken across seeds.
    """
    cfg = settings.ablation
    arms = [a.name for a in cfg.arms]
    base_arms = {a.name for a in cfg.arms if a.base}
    categories: dict[str, str] = {}
    for r in records:
        categories.update(r.categories)
    tasks = list(dict.fromkeys(t for r in records for t in r.scores))
    types = sorted(set(categories.values()))

    def per_seed_metrics(r: RunRecord) -> dict[str, float]:
        out = dict(r.scores)
        for kind in types:
            values = [r.scores[t] for t in tasks if categories.get(t) == kind and t in r.scores]
            if values:
                out[f"type:{kind}"] = statistics.fmean(values)
        out[OVERALL] = statistics.fmean(r.scores[t] for t in tasks if t in r.scores)
        return out

    metrics = [*tasks, *(f"type:{k}" for k in types), OVERALL]
    cells: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    masked: dict[str, dict[str, dict[str, float]]] = {}
    losses: dict[str, dict[str, dict[str, float]]] = {}
    for arm in arms:
        cells[arm] = {}
        for noise in cfg.noise_levels:
            chosen = [r for r in records if r.arm == arm and (arm in base_arms or r.noise == noise)]
            if not chosen:
                continue
            values = [per_seed_metrics(r) for r in chosen]
            cells[arm][_noise_key(noise)] = {m: _mean_std([v[m] for v in values if m in v]) for m in metrics}
            rates = [r.masked for r in chosen if r.masked]
            if rates:
                keys = sorted({k for rate in rates for k in rate})
                masked.setdefault(arm, {})[_noise_key(noise)] = {
                    k: statistics.fmean(rate[k] for rate in rates if k in rate) for k in keys
                }
            train_losses = [r.train_loss for r in chosen if r.train_loss is not None and not math.isnan(r.train_loss)]
            if train_losses:
                losses.setdefault(arm, {})[_noise_key(noise)] = _mean_std(train_losses)
    comparisons = []
    for a, b in cfg.compare:
        for noise in cfg.noise_levels:
            key = _noise_key(noise)
            if key not in cells.get(a, {}) or key not in cells.get(b, {}):
                continue
            for m in metrics:
                ca, cb = cells[a][key][m], cells[b][key][m]
                comparisons.append(
                    {
                        "arm": a,
                        "against": b,
                        "noise": noise,
                        "metric": m,
                        "difference": ca["mean"] - cb["mean"],
                        "spread": max(ca["std"], cb["std"]),
                        "verdict": verdict(ca, cb),
                    }
                )
    return {
        "agreement": cache_agreement(records, settings),
        "arms": arms,
        "noise_levels": list(cfg.noise_levels),
        "seeds": list(cfg.seeds),
        "tasks": tasks,
        "categories": categories,
        "metrics": metrics,
        "cells": cells,
        "comparisons": comparisons,
        "masked": masked,
        "train_loss": losses,
        "data": data or {},
        "runs": len(records),
    }


def cache_agreement(records: Sequence[RunRecord], settings: Settings) -> list[dict[str, Any]]:
    """For arms that differ only in ``train.guide_cache`` (cached vs live guide): the largest score gap.

    The cached guide returns the embeddings the live guide computes, so paired runs (same noise
    level and seed) must score the same up to float rounding.
    """
    trained = [a for a in settings.ablation.arms if not a.base]
    out = []
    for i, a in enumerate(trained):
        for b in trained[i + 1 :]:
            rest_a = {k: v for k, v in a.train.items() if k != "guide_cache"}
            rest_b = {k: v for k, v in b.train.items() if k != "guide_cache"}
            if rest_a != rest_b or a.mining != b.mining or a.train.get("guide_cache") == b.train.get("guide_cache"):
                continue
            gaps = [
                abs(ra.scores[t] - rb.scores[t])
                for ra in records
                if ra.arm == a.name
                for rb in records
                if rb.arm == b.name and (rb.noise, rb.seed) == (ra.noise, ra.seed)
                for t in ra.scores
                if t in rb.scores
            ]
            if gaps:
                out.append({"arms": [a.name, b.name], "pairs": len(gaps), "max_abs_difference": max(gaps)})
    return out


def _noise_key(noise: float) -> str:
    return f"{noise:.2f}"


def _percent(noise: float | str) -> str:
    return f"{100 * float(noise):.0f}%"


def _metric_label(metric: str) -> str:
    if metric == OVERALL:
        return "mean over tasks"
    return f"{metric.removeprefix('type:')} (mean)" if metric.startswith("type:") else metric


def summary_markdown(summary: dict[str, Any], settings: Settings, command: str, when: str = "") -> str:
    """The ablation's report: scores per arm and noise level (mean ± std over seeds), verdicts, masking."""
    cfg = settings.ablation
    metrics = summary["metrics"]
    lines = [
        "# Ablation: does the guide help?",
        "",
        f"Command: `{command}`" + (f" ({when})" if when else ""),
        "",
        f"Student `{settings.base.student}`, guide `{settings.base.guide}`; {cfg.max_steps} steps at batch "
        f"{cfg.batch_size}, learning rate {settings.train.learning_rate:g}, max_seq_length "
        f"{settings.train.max_seq_length}; seeds {', '.join(map(str, summary['seeds']))}; noise levels "
        f"{', '.join(f'{100 * n:.0f}%' for n in summary['noise_levels'])} (of corrupted triplets, "
        f"{100 * cfg.positive_noise_share:.0f}% with a replaced positive, the rest a false negative); "
        f"{summary['runs']} runs. Base arms do not train: their one score stands for every noise level.",
    ]
    for variant, info in summary["data"].items():
        lines.append(f"Data `{variant}`: {info['source']} (subset md5 `{info['md5']}`).")
    labels = [_metric_label(m) for m in metrics]
    right = ["right"] * len(metrics)
    lines += ["", "## Scores (MTEB main score × 100, mean ± standard deviation over seeds)", ""]
    lines += markdown_table(
        ["arm", "noise", *labels],
        (
            [arm, _percent(noise_key), *(f"{100 * cell[m]['mean']:.2f} ± {100 * cell[m]['std']:.2f}" for m in metrics)]
            for arm in summary["arms"]
            for noise_key, cell in summary["cells"].get(arm, {}).items()
        ),
        align=["left", "right", *right],
    )
    lines += [
        "",
        "## Verdicts",
        "",
        "A difference counts as a win or a loss only when it is larger than the spread (the larger of the "
        "two arms' standard deviations over seeds); otherwise it is a tie. The base arm has no spread.",
        "",
    ]
    grouped: dict[tuple[str, str, float], dict[str, dict[str, Any]]] = {}
    for c in summary["comparisons"]:
        grouped.setdefault((c["arm"], c["against"], c["noise"]), {})[c["metric"]] = c
    lines += markdown_table(
        ["arm", "against", "noise", *labels],
        (
            [
                a,
                b,
                _percent(noise),
                *(f"{100 * by[m]['difference']:+.2f} {by[m]['verdict']}" for m in metrics if m in by),
            ]
            for (a, b, noise), by in grouped.items()
        ),
        align=["left", "left", "right", *right],
    )
    if summary["masked"]:
        lines += [
            "",
            "## What the guide masked (mean over logged intervals and seeds)",
            "",
            "*all*: share of in-batch candidates masked; *same label*: share of candidates with the anchor's "
            "label (false negatives) that were masked; *other label*: share of candidates with another label "
            "(true negatives) that were masked; *same-label share*: of the masked candidates, the share with "
            "the anchor's label.",
            "",
        ]
        cols = [
            "guide_masked_fraction",
            "guide_masked_same_label",
            "guide_masked_other_label",
            "guide_masked_same_label_share",
        ]
        lines += markdown_table(
            ["arm", "noise", "all", "same label", "other label", "same-label share"],
            (
                [arm, _percent(noise_key), *(f"{100 * rates[c]:.1f}%" if c in rates else "n/a" for c in cols)]
                for arm, by_noise in summary["masked"].items()
                for noise_key, rates in by_noise.items()
            ),
            align=["left", "right", "right", "right", "right", "right"],
        )
    if summary["agreement"]:
        lines += [
            "",
            "## Cached vs live guide",
            "",
            "Arms that differ only in `train.guide_cache`, paired by noise level and seed:",
            "",
        ]
        for item in summary["agreement"]:
            lines.append(
                f"- {item['arms'][0]} vs {item['arms'][1]}: largest score difference "
                f"{100 * item['max_abs_difference']:.4f} points over {item['pairs']} paired task scores."
            )
    if summary["train_loss"]:
        lines += ["", "## Mean training loss", ""]
        lines += markdown_table(
            ["arm", "noise", "loss"],
            (
                [arm, _percent(noise_key), f"{cell['mean']:.4f} ± {cell['std']:.4f}"]
                for arm, by_noise in summary["train_loss"].items()
                for noise_key, cell in by_noise.items()
            ),
            align=["left", "right", "right"],
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Score vs noise level, one line per arm (error bars: std over seeds), one panel per task and the mean."""
    # deferred: matplotlib takes a second to import
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [*summary["tasks"], OVERALL]
    figure = Figure(figsize=(4.2 * len(panels), 3.6), dpi=110)
    FigureCanvasAgg(figure)
    noise_levels = summary["noise_levels"]
    x = [100 * n for n in noise_levels]
    for i, metric in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), i + 1)
        for arm in summary["arms"]:
            cells = summary["cells"].get(arm, {})
            points = [
                (xi, cells[_noise_key(n)][metric])
                for xi, n in zip(x, noise_levels, strict=True)
                if _noise_key(n) in cells and metric in cells[_noise_key(n)]
            ]
            if not points:
                continue
            axes.errorbar(
                [p[0] for p in points],
                [100 * p[1]["mean"] for p in points],
                yerr=[100 * p[1]["std"] for p in points],
                marker="o",
                capsize=3,
                label=arm,
                linestyle="--" if all(p[1]["n"] == 1 and p[1]["std"] == 0 for p in points) else "-",
            )
        axes.set_title(_metric_label(metric), fontsize=10)
        axes.set_xlabel("noisy triplets (%)")
        axes.set_xticks(x)
        if i == 0:
            axes.set_ylabel("score × 100 (mean ± std over seeds)")
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=8, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def write_report(summary: dict[str, Any], settings: Settings, command: str, when: str = "") -> dict[str, Path]:
    """Write ablation.md, ablation.png and ablation.json to the output folder (and the docs copy, if set)."""
    folder = output_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    markdown = summary_markdown(summary, settings, command, when)
    paths = {"markdown": folder / "ablation.md", "chart": folder / "ablation.png", "json": folder / "ablation.json"}
    paths["markdown"].write_text(markdown)
    plot(summary, paths["chart"])
    paths["json"].write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if settings.ablation.docs:
        docs = settings.path(settings.ablation.docs)
        docs.parent.mkdir(parents=True, exist_ok=True)
        chart = docs.with_suffix(".png")
        docs.write_text(markdown + f"\n![score vs noise level per arm]({chart.name})\n")
        shutil.copyfile(paths["chart"], chart)
        paths["docs"], paths["docs_chart"] = docs, chart
    return paths
