"""The ablation: does the guide help? The same student, data, steps, batch and seeds under several arms.

Default arms (params.yaml ``ablation``): the untrained student (``base``), MultipleNegativesRankingLoss
without a guide (``mnrl``) and the guided GISTEmbed loss (``gist``). Every trained arm runs once per
seed and noise level, on the same data version; at a given seed and noise level every arm sees the
same (corrupted) triplets, so arms are compared pairwise on identical data.

Noise (``inject_noise``) corrupts a controlled fraction of the triplets the way mined data goes
wrong: a positive replaced by a text of another label of the same task (an unrelated text), or a
negative replaced by another text of the anchor's own label (a false negative). Replacements come
from the triplets' own texts, so one guide-embedding cache of the clean data serves every noise
level, and each corrupted row is written to a CSV beside the noisy file.

A difference between two arms counts as a win or a loss only when it is larger than the spread
across seeds (the larger of the two arms' standard deviations); otherwise it is a tie.

Functions here are plain: ``flows/ablation.py`` orders them as Prefect tasks and ``gist ablation``
runs that flow. Each run writes ``result.json`` into its folder, so an interrupted ablation started
again with the same settings skips the runs already done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gist_core import registry
from gist_core.config import AblationArm, Settings, with_overrides
from gist_core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
CORRUPTED_SUFFIX = ".corrupted.csv"
DEFAULT_VARIANT = "default"
OVERALL = "mean"  # the mean over tasks, per seed, then across seeds
RESULT_FORMAT = 1
# `gist ablation --quick`: a few minutes on 2 cores, for tests and a first look (not for conclusions).
QUICK_OVERRIDES: dict[str, Any] = {
    "ablation.seeds": [1, 2],
    "ablation.noise_levels": [0.0, 0.4],
    "ablation.max_steps": 2,
    "ablation.batch_size": 8,
    "ablation.max_triplets_per_task": 48,
    "ablation.tasks": ["STSBenchmark"],
    "ablation.output_dir": "outputs/ablation-quick",
    "ablation.docs": None,
}


@dataclass(frozen=True)
class RunSpec:
    """One training (or, for a base arm, scoring) run of the ablation."""

    arm: str
    noise: float
    seed: int

    @property
    def label(self) -> str:
        return f"{self.arm}/noise-{self.noise:.2f}/seed-{self.seed}"


@dataclass
class RunRecord:
    """What one run produced: its scores, training summary and guide masking rates."""

    arm: str
    noise: float
    seed: int
    scores: dict[str, float]  # task -> main score (0-1)
    categories: dict[str, str]  # task -> MTEB task type
    key: str = ""
    steps: int = 0
    train_loss: float | None = None
    seconds: float = 0.0
    masked: dict[str, float] = field(default_factory=dict)  # guide_masked_* means over the logged intervals
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    data_file: str | None = None
    run_id: str | None = None
    reused: bool = field(default=False, compare=False)  # read from an earlier invocation's result.json

    def to_dict(self) -> dict[str, Any]:
        return {"format": RESULT_FORMAT, **{k: v for k, v in asdict(self).items() if k != "reused"}}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunRecord:
        raw = {k: v for k, v in raw.items() if k not in ("format", "reused")}
        raw["loss_curve"] = [tuple(point) for point in raw.get("loss_curve") or []]
        return cls(**raw)


# ---------------------------------------------------------------- noise


@dataclass(frozen=True)
class NoiseReport:
    level: float
    seed: int
    rows: int
    eligible: int  # rows with labels, which can be corrupted
    corrupted_positive: int
    corrupted_negative: int
    no_replacement: int  # chosen rows left as they were: their task had no text to swap in

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inject_noise(
    frame: pd.DataFrame, level: float, seed: int, positive_share: float = 0.5
) -> tuple[pd.DataFrame, pd.DataFrame, NoiseReport]:
    """Corrupt ``round(level * rows)`` triplets; return the noisy frame, the corrupted rows and the counts.

    Of the chosen rows, ``positive_share`` get their positive replaced by a text of the same task
    with another label; the rest get their negative replaced by another text of the anchor's label
    (neither the anchor nor its positive). Only rows with an anchor label can be corrupted; if
    fewer are eligible than asked, all of them are. The label columns follow the replacement and
    the guide's similarity columns of a corrupted row become NaN (no longer measured).
    """
    if not 0 <= level < 1:
        raise ValueError(f"noise level must be in [0, 1), got {level}")
    needed = {"anchor", "positive", "negative", "task_name", "anchor_label", "positive_label", "negative_label"}
    missing = sorted(needed - set(frame.columns))
    if missing:
        raise DataError(f"noise injection needs label columns; the triplets lack {missing}")
    out = frame.reset_index(drop=True).copy()
    out["noise"] = ""
    rng = np.random.default_rng(seed)
    labelled = out["anchor_label"].notna() & (out["anchor_label"].astype(str) != "")
    eligible = np.flatnonzero(labelled.to_numpy())
    wanted = min(round(level * len(out)), len(eligible))
    chosen = rng.choice(eligible, size=wanted, replace=False) if wanted else np.array([], dtype=int)
    n_positive = round(wanted * positive_share)

    # Every labelled text of each task, by label: the pool replacements are drawn from.
    pool: dict[str, dict[str, list[str]]] = {}
    for text_col, label_col in (
        ("anchor", "anchor_label"),
        ("positive", "positive_label"),
        ("negative", "negative_label"),
    ):
        for task, text, label in zip(out["task_name"], out[text_col], out[label_col], strict=True):
            if isinstance(label, str) and label:
                pool.setdefault(task, {}).setdefault(label, []).append(text)
    by_task = {task: {label: sorted(set(texts)) for label, texts in labels.items()} for task, labels in pool.items()}

    log_rows: list[dict[str, Any]] = []
    counts = {"positive": 0, "negative": 0, "none": 0}
    for i, row_index in enumerate(chosen.tolist()):
        row = out.loc[row_index]
        kind = "positive" if i < n_positive else "negative"
        labels = by_task.get(row["task_name"], {})
        anchor_label = row["anchor_label"]
        if kind == "positive":
            others = [label for label in labels if label != anchor_label]
            label = others[rng.integers(len(others))] if others else None
            candidates = labels.get(label, []) if label is not None else []
        else:
            label = anchor_label
            candidates = [t for t in labels.get(label, []) if t not in (row["anchor"], row["positive"])]
        if not candidates:
            counts["none"] += 1
            continue
        text = candidates[rng.integers(len(candidates))]
        log_rows.append(
            {
                "row": row_index,
                "task_name": row["task_name"],
                "kind": kind,
                "was": row[kind],
                "now": text,
                "anchor_label": anchor_label,
                "was_label": row[f"{kind}_label"],
                "now_label": label,
            }
        )
        out.at[row_index, kind] = text
        out.at[row_index, f"{kind}_label"] = label
        out.at[row_index, "noise"] = kind
        for column in ("guide_pos_sim", "guide_neg_sim"):
            if column in out.columns:
                out.at[row_index, column] = float("nan")
        counts[kind] += 1
    report = NoiseReport(
        level=level,
        seed=seed,
        rows=len(out),
        eligible=len(eligible),
        corrupted_positive=counts["positive"],
        corrupted_negative=counts["negative"],
        no_replacement=counts["none"],
    )
    corrupted = pd.DataFrame(
        log_rows, columns=["row", "task_name", "kind", "was", "now", "anchor_label", "was_label", "now_label"]
    )
    return out, corrupted, report


def subset_per_task(frame: pd.DataFrame, per_task: int | None, seed: int) -> pd.DataFrame:
    """A seeded sample of at most ``per_task`` triplets of each task (all of them for None), order kept."""
    if per_task is None:
        return frame
    keep = [
        group.sample(n=min(per_task, len(group)), random_state=seed).index
        for _, group in frame.groupby("task_name", sort=True)
    ]
    return frame.loc[sorted(np.concatenate(keep).tolist())].reset_index(drop=True)


# ---------------------------------------------------------------- planning


def arms_by_name(settings: Settings) -> dict[str, AblationArm]:
    return {arm.name: arm for arm in settings.ablation.arms}


def plan(settings: Settings) -> list[RunSpec]:
    """Every run, in the order they execute: base arms once, then each noise level, seed and arm."""
    cfg = settings.ablation
    specs = [RunSpec(a.name, 0.0, settings.base.seed) for a in cfg.arms if a.base]
    trained = [a for a in cfg.arms if not a.base]
    for noise in cfg.noise_levels:
        for seed in cfg.seeds:
            specs += [RunSpec(a.name, noise, seed) for a in trained]
    return specs


def variant_of(arm: AblationArm) -> str:
    """Arms with mining overrides train on their own re-mined data; the others share the default data."""
    return arm.name if arm.mining else DEFAULT_VARIANT


def output_dir(settings: Settings) -> Path:
    return settings.path(settings.ablation.output_dir)


def run_dir(settings: Settings, spec: RunSpec) -> Path:
    return output_dir(settings) / "runs" / spec.arm / f"noise-{spec.noise:.2f}" / f"seed-{spec.seed}"


def variant_dir(settings: Settings, variant: str) -> Path:
    return output_dir(settings) / "data" / variant


def clean_file(settings: Settings, variant: str) -> Path:
    return variant_dir(settings, variant) / "clean.parquet"


def noisy_file(settings: Settings, variant: str, noise: float, seed: int) -> Path:
    if noise == 0:
        return clean_file(settings, variant)
    return variant_dir(settings, variant) / f"noise-{noise:.2f}-seed-{seed}.parquet"


def guide_cache_dir(settings: Settings, variant: str, data_md5: str | None = None) -> Path:
    """The variant's guide-embedding cache: the DVC stage's when built for the same data, else the ablation's own."""
    from gist_core.guide_cache import read_manifest

    staged = settings.path(settings.train.guide_cache_dir)
    identity = (read_manifest(staged) or {}).get("identity") or {}
    if (
        variant == DEFAULT_VARIANT
        and data_md5 is not None
        and identity.get("data_md5") == data_md5
        and identity.get("max_seq_length") == settings.train.max_seq_length
        and identity.get("guide") == settings.base.guide
    ):
        return staged
    return output_dir(settings) / "guide_cache" / variant


def eval_tasks(settings: Settings) -> list[str]:
    return list(settings.ablation.tasks or settings.evaluate.tasks)


def check(settings: Settings) -> None:
    """Cheap checks before any work: the evaluation tasks exist and a trained arm has labelled data to corrupt."""
    from gist_core.tasks import build_tasks

    cfg = settings.evaluate
    build_tasks(eval_tasks(settings), settings.path(cfg.data_dir), custom_tasks=cfg.custom_tasks, root=settings.root)
    if not any(not arm.base for arm in settings.ablation.arms) and any(n > 0 for n in settings.ablation.noise_levels):
        log.warning("ablation: only base arms; the noise levels change nothing")


# ---------------------------------------------------------------- data


def _source_triplets(settings: Settings, arm: AblationArm) -> Path:
    """The arm's full triplets: the data stage's output, or (mining overrides) a re-mined copy of its own."""
    if not arm.mining:
        path = settings.path(settings.data.output)
        if not path.is_file():
            raise DataError(f"{path}: no prepared triplets; run `gist version-data` (or `dvc repro data`) first")
        return path
    from gist_core.stages import run_data_stage

    folder = variant_dir(settings, variant_of(arm)) / "prepared"
    overrides: dict[str, Any] = {f"data.mining.{k}": v for k, v in arm.mining.items()}
    overrides |= {
        "data.mined": str(folder / "mined"),
        "data.output": str(folder / "triplets.parquet"),
        "data.report": str(folder / "data.json"),
        "data.report_markdown": str(folder / "data.md"),
        "data.quarantine": str(folder / "quarantine.csv"),
    }
    variant = with_overrides(settings, overrides)
    log.info("ablation arm %s: mining its own triplets (%s)", arm.name, arm.mining)
    run_data_stage(variant, mine=True)
    return variant.path(variant.data.output)


def prepare_data(settings: Settings) -> dict[str, dict[str, Any]]:
    """Write each data variant's clean subset and its noisy copies (one per noise level and seed).

    Returns, per variant, the clean file, its md5 and the noise reports. Files whose inputs are
    unchanged are rewritten with the same bytes (the sampling is seeded).
    """
    from gist_core.data import load_triplets
    from gist_core.guide_cache import file_md5

    cfg = settings.ablation
    out: dict[str, dict[str, Any]] = {}
    for arm in cfg.arms:
        variant = variant_of(arm)
        if arm.base or variant in out:
            continue
        source = _source_triplets(settings, arm)
        frame = subset_per_task(load_triplets(source), cfg.max_triplets_per_task, settings.base.seed)
        clean = clean_file(settings, variant)
        clean.parent.mkdir(parents=True, exist_ok=True)
        if cfg.max_triplets_per_task is None:
            shutil.copyfile(source, clean)  # the data version's own bytes: its guide cache applies as is
        else:
            frame.to_parquet(clean, index=False)
        reports = []
        for noise in cfg.noise_levels:
            if noise == 0:
                continue
            for seed in cfg.seeds:
                noisy, corrupted, report = inject_noise(frame, noise, seed, cfg.positive_noise_share)
                path = noisy_file(settings, variant, noise, seed)
                noisy.to_parquet(path, index=False)
                corrupted.to_csv(path.with_suffix(CORRUPTED_SUFFIX), index=False)
                reports.append(report.to_dict())
        out[variant] = {
            "source": _relative(settings, source),
            "clean": str(clean),
            "md5": file_md5(clean),
            "noise": reports,
        }
    return out


def _relative(settings: Settings, path: Path) -> str:
    """A path as the report shows it: relative to the project root when inside it."""
    try:
        return str(path.resolve().relative_to(settings.root.resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- runs


def _arm_settings(settings: Settings, arm: AblationArm, spec: RunSpec, folder: Path, data_md5: str) -> Settings:
    cfg = settings.ablation
    overrides: dict[str, Any] = {f"train.{k}": v for k, v in arm.train.items()}
    overrides |= {
        "base.seed": spec.seed,
        "train.max_steps": cfg.max_steps,
        "train.batch_size": cfg.batch_size,
        "train.logging_steps": max(1, min(5, cfg.max_steps // 4 or 1)),
        "train.output_dir": str(folder / "model"),
        "train.save_steps": None,
        "train.guide_cache_dir": str(guide_cache_dir(settings, variant_of(arm), data_md5)),
    }
    if "num_train_epochs" in type(settings.train).model_fields:
        overrides["train.num_train_epochs"] = None  # the ablation trains by steps
    return with_overrides(settings, overrides)


def run_key(settings: Settings, spec: RunSpec, data_md5: str | None) -> str:
    """A hash of everything that decides a run's result: a rerun with the same key reuses its result."""
    arm = arms_by_name(settings)[spec.arm]
    payload = {
        "arm": arm.model_dump(mode="json"),
        "spec": asdict(spec),
        "data_md5": data_md5,
        "student": settings.base.student,
        "guide": settings.base.guide,
        "train": settings.train.model_dump(mode="json"),
        "ablation": settings.ablation.model_dump(
            mode="json", include={"max_steps", "batch_size", "max_triplets_per_task", "positive_noise_share"}
        ),
        "evaluate": settings.evaluate.model_dump(mode="json", include={"max_seq_length", "precision"}),
        "tasks": eval_tasks(settings),
        "format": RESULT_FORMAT,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _score(settings: Settings, ref: Any) -> tuple[dict[str, float], dict[str, str]]:
    from gist_core.evaluate import score_model
    from gist_core.tasks import build_tasks

    cfg = settings.evaluate
    tasks = build_tasks(
        eval_tasks(settings), settings.path(cfg.data_dir), custom_tasks=cfg.custom_tasks, root=settings.root
    )
    scored = score_model(
        ref,
        tasks,
        cache_dir=settings.path(cfg.cache_dir),
        batch_size=cfg.batch_size,
        max_seq_length=cfg.max_seq_length,
        show_progress_bar=False,
        precision=cfg.precision,
    )
    return (
        {task: s.main_score for task, s in scored.scores.items()},
        {task: s.category for task, s in scored.scores.items()},
    )


def _masked_means(history: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for entry in history for k in entry if k.startswith("guide_masked")})
    return {k: statistics.fmean(e[k] for e in history if k in e) for k in keys}


def execute_run(
    settings: Settings,
    spec: RunSpec,
    data: dict[str, dict[str, Any]],
    parent_run_id: str | None = None,
) -> RunRecord:
    """Train (unless a base arm) and score one run; reuse its stored result when the key matches."""
    from gist_core.models import ModelRef, ensure_available, resolve_model
    from gist_core.train import train

    arm = arms_by_name(settings)[spec.arm]
    variant = data.get(variant_of(arm))
    key = run_key(settings, spec, variant["md5"] if variant else None)
    folder = run_dir(settings, spec)
    stored = folder / RESULT_FILE
    if stored.is_file():
        try:
            record = RunRecord.from_dict(json.loads(stored.read_text()))
        except (ValueError, TypeError) as err:
            log.warning("%s: unreadable (%s); running %s again", stored, err, spec.label)
        else:
            if record.key == key:
                log.info("%s: reusing the stored result (%s)", spec.label, stored)
                record.reused = True
                return record
    folder.mkdir(parents=True, exist_ok=True)
    store = mlflow_store(settings)
    run_id = None
    if parent_run_id:
        run_id = registry.start_run(
            store,
            run_name=spec.label.replace("/", " "),
            tags={
                "mlflow.parentRunId": parent_run_id,
                "ablation.arm": spec.arm,
                "ablation.noise": spec.noise,
                "ablation.seed": spec.seed,
            },
        )
    try:
        if arm.base:
            student = ensure_available(
                resolve_model(settings.base.student, settings.path(settings.base.models_dir), settings.root)
            )
            scores, categories = _score(settings, student)
            record = RunRecord(spec.arm, spec.noise, spec.seed, scores, categories, key=key, run_id=run_id)
        else:
            if variant is None:
                raise ConfigError(f"ablation arm {spec.arm!r}: its data was not prepared (run prepare_data first)")
            run_settings = _arm_settings(settings, arm, spec, folder, variant["md5"])
            triplets = noisy_file(settings, variant_of(arm), spec.noise, spec.seed)
            if run_id:
                registry.log_params(store, run_id, run_settings.stage_params("base", "train"))
            on_log = registry.metric_logger(store, run_id) if run_id else None
            result = train(run_settings, triplets, on_log=on_log, guide_cache_for=Path(variant["clean"]))
            model_dir = run_settings.path(run_settings.train.output_dir)
            scores, categories = _score(settings, ModelRef(spec.label, "path", str(model_dir)))
            record = RunRecord(
                spec.arm,
                spec.noise,
                spec.seed,
                scores,
                categories,
                key=key,
                steps=result.steps,
                train_loss=result.train_loss,
                seconds=round(result.seconds, 2),
                masked=_masked_means(result.history),
                loss_curve=[(int(e["step"]), float(e["loss"])) for e in result.history if "loss" in e and "step" in e],
                data_file=str(triplets),
                run_id=run_id,
            )
            if not settings.ablation.keep_models:
                shutil.rmtree(model_dir, ignore_errors=True)
        if run_id:
            metrics = {f"eval/{task}": value for task, value in scores.items()}
            metrics[f"eval/{OVERALL}"] = statistics.fmean(scores.values())
            metrics |= {f"train/{k}_mean": v for k, v in record.masked.items()}
            registry.log_metrics(store, run_id, metrics)
            registry.end_run(store, run_id)
    except BaseException:
        if run_id:
            registry.end_run(store, run_id, status="FAILED")
        raise
    stored.write_text(json.dumps(record.to_dict(), indent=2) + "\n")
    return record


# ---------------------------------------------------------------- summary


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
    lines += [
        "",
        "## Scores (MTEB main score × 100, mean ± standard deviation over seeds)",
        "",
        "| arm | noise | " + " | ".join(_metric_label(m) for m in metrics) + " |",
        "|---|---:|" + "---:|" * len(metrics),
    ]
    for arm in summary["arms"]:
        for noise_key, cell in summary["cells"].get(arm, {}).items():
            values = " | ".join(f"{100 * cell[m]['mean']:.2f} ± {100 * cell[m]['std']:.2f}" for m in metrics)
            lines.append(f"| {arm} | {100 * float(noise_key):.0f}% | {values} |")
    lines += [
        "",
        "## Verdicts",
        "",
        "A difference counts as a win or a loss only when it is larger than the spread (the larger of the "
        "two arms' standard deviations over seeds); otherwise it is a tie. The base arm has no spread.",
        "",
        "| arm | against | noise | " + " | ".join(_metric_label(m) for m in metrics) + " |",
        "|---|---|---:|" + "---:|" * len(metrics),
    ]
    grouped: dict[tuple[str, str, float], dict[str, dict[str, Any]]] = {}
    for c in summary["comparisons"]:
        grouped.setdefault((c["arm"], c["against"], c["noise"]), {})[c["metric"]] = c
    for (a, b, noise), by_metric in grouped.items():
        values = " | ".join(
            f"{100 * by_metric[m]['difference']:+.2f} {by_metric[m]['verdict']}" for m in metrics if m in by_metric
        )
        lines.append(f"| {a} | {b} | {100 * noise:.0f}% | {values} |")
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
            "| arm | noise | all | same label | other label | same-label share |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for arm, by_noise in summary["masked"].items():
            for noise_key, rates in by_noise.items():
                cols = [
                    "guide_masked_fraction",
                    "guide_masked_same_label",
                    "guide_masked_other_label",
                    "guide_masked_same_label_share",
                ]
                values = " | ".join(f"{100 * rates[c]:.1f}%" if c in rates else "n/a" for c in cols)
                lines.append(f"| {arm} | {100 * float(noise_key):.0f}% | {values} |")
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
        lines += ["", "## Mean training loss", "", "| arm | noise | loss |", "|---|---:|---:|"]
        for arm, by_noise in summary["train_loss"].items():
            for noise_key, cell in by_noise.items():
                lines.append(f"| {arm} | {100 * float(noise_key):.0f}% | {cell['mean']:.4f} ± {cell['std']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Score vs noise level, one line per arm (error bars: std over seeds), one panel per task and the mean."""
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


def mlflow_store(settings: Settings) -> Settings:
    """The registry settings with the ablation's own MLflow experiment."""
    return with_overrides(settings, {"registry.experiment": settings.ablation.experiment})


def start_parent_run(settings: Settings, command: str) -> str:
    store = mlflow_store(settings)
    run_id = registry.start_run(store, run_name="ablation", tags={"ablation.command": command})
    registry.log_params(store, run_id, settings.stage_params("base", "ablation"))
    return run_id


def finish_parent_run(settings: Settings, run_id: str, summary: dict[str, Any], paths: dict[str, Path]) -> None:
    store = mlflow_store(settings)
    metrics = {
        f"{arm}/noise-{noise_key}/{m.replace('type:', '')}": cell[m]["mean"]
        for arm, by_noise in summary["cells"].items()
        for noise_key, cell in by_noise.items()
        for m in (OVERALL, *summary["tasks"])
    }
    registry.log_metrics(store, run_id, metrics)
    registry.log_artifact_file(store, run_id, paths["markdown"], "ablation/ablation.md")
    registry.log_artifact_file(store, run_id, paths["chart"], "ablation/ablation.png")
    registry.log_artifact_file(store, run_id, paths["json"], "ablation/ablation.json")
    registry.end_run(store, run_id)
