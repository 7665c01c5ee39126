"""Running the ablation: the data variants, then one run at a time (train unless a base arm, then score).

Each run writes ``result.json`` into its folder, so an interrupted ablation started again with the
same settings skips the runs already done. MLflow gets a parent run and a child run per arm, noise
level and seed, in the ablation's own experiment.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from gist_core.ablation.noise import inject_noise, subset_per_task
from gist_core.ablation.plan import (
    CORRUPTED_SUFFIX,
    OVERALL,
    RESULT_FILE,
    RunRecord,
    RunSpec,
    arms_by_name,
    clean_file,
    eval_tasks,
    guide_cache_dir,
    noisy_file,
    run_dir,
    run_key,
    variant_dir,
    variant_of,
)
from gist_core.config import AblationArm, Settings, with_overrides
from gist_core.data.schema import load_triplets
from gist_core.data.stage import data_stage
from gist_core.errors import ConfigError, DataError
from gist_core.evaluation.evaluate import score_model
from gist_core.evaluation.tasks import build_tasks
from gist_core.hashing import file_md5
from gist_core.models import ModelRef, ensure_available, resolve_model
from gist_core.registry import tracking
from gist_core.training.trainer import train

log = logging.getLogger(__name__)


def _source_triplets(settings: Settings, arm: AblationArm) -> Path:
    """The arm's full triplets: the data stage's output, or (mining overrides) a re-mined copy of its own."""
    if not arm.mining:
        path = settings.path(settings.data.output)
        if not path.is_file():
            raise DataError(f"{path}: no prepared triplets; run `gist version-data` (or `dvc repro data`) first")
        return path
    folder = variant_dir(settings, variant_of(arm)) / "prepared"
    overrides: dict[str, Any] = {f"data.mining.{k}": v for k, v in arm.mining.items()}
    overrides |= {
        "data.embeddings": str(folder / "guide_embeddings"),
        "data.mined": str(folder / "mined"),
        "data.output": str(folder / "triplets.parquet"),
        "data.report": str(folder / "data.json"),
        "data.report_markdown": str(folder / "data.md"),
        "data.quarantine": str(folder / "quarantine.csv"),
    }
    variant = with_overrides(settings, overrides)
    log.info("ablation arm %s: mining its own triplets (%s)", arm.name, arm.mining)
    data_stage(variant, mine=True)
    return variant.path(variant.data.output)


def prepare_data(settings: Settings) -> dict[str, dict[str, Any]]:
    """Write each data variant's clean subset and its noisy copies (one per noise level and seed).

    Returns, per variant, the clean file, its md5 and the noise reports. Files whose inputs are
    unchanged are rewritten with the same bytes (the sampling is seeded).
    """
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


def _arm_settings(settings: Settings, arm: AblationArm, spec: RunSpec, folder: Path, data_md5: str) -> Settings:
    cfg = settings.ablation
    overrides: dict[str, Any] = {f"train.{k}": v for k, v in arm.train.items()}
    overrides |= {
        "base.seed": spec.seed,
        "train.max_steps": cfg.max_steps,
        "train.num_train_epochs": None,  # the ablation trains by steps
        "train.batch_size": cfg.batch_size,
        "train.logging_steps": max(1, min(5, cfg.max_steps // 4 or 1)),
        "train.output_dir": str(folder / "model"),
        "train.save_steps": None,
        "train.cached_models": 0,  # result.json is the ablation's reuse; its models must not evict the pipeline's
        "train.guide_cache_dir": str(guide_cache_dir(settings, variant_of(arm), data_md5)),
    }
    return with_overrides(settings, overrides)


def _score(settings: Settings, ref: ModelRef) -> tuple[dict[str, float], dict[str, str]]:
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
        run_id = tracking.start_run(
            store,
            run_name=spec.label.replace("/", " "),
            tags={
                "mlflow.parentRunId": parent_run_id,
                "ablation.arm": spec.arm,
                "ablation.noise": spec.noise,
                "ablation.seed": spec.seed,
            },
        )
    with tracking.failing_run_marks_failed(store, run_id) if run_id else nullcontext():
        record = _train_and_score(settings, arm, spec, variant, key, run_id)
        if run_id:
            metrics = {f"eval/{task}": value for task, value in record.scores.items()}
            metrics[f"eval/{OVERALL}"] = statistics.fmean(record.scores.values())
            metrics |= {f"train/{k}_mean": v for k, v in record.masked.items()}
            tracking.log_metrics(store, run_id, metrics)
    stored.write_text(json.dumps(record.to_dict(), indent=2) + "\n")
    return record


def _train_and_score(
    settings: Settings,
    arm: AblationArm,
    spec: RunSpec,
    variant: dict[str, Any] | None,
    key: str,
    run_id: str | None,
) -> RunRecord:
    if arm.base:
        student = ensure_available(
            resolve_model(settings.base.student, settings.path(settings.base.models_dir), settings.root)
        )
        scores, categories = _score(settings, student)
        return RunRecord(spec.arm, spec.noise, spec.seed, scores, categories, key=key, run_id=run_id)
    if variant is None:
        raise ConfigError(f"ablation arm {spec.arm!r}: its data was not prepared (run prepare_data first)")
    store = mlflow_store(settings)
    run_settings = _arm_settings(settings, arm, spec, run_dir(settings, spec), variant["md5"])
    triplets = noisy_file(settings, variant_of(arm), spec.noise, spec.seed)
    if run_id:
        tracking.log_params(store, run_id, run_settings.stage_params("base", "train"))
    on_log = tracking.metric_logger(store, run_id) if run_id else None
    result = train(run_settings, triplets, on_log=on_log, guide_cache_for=Path(variant["clean"]))
    model_dir = run_settings.path(run_settings.train.output_dir)
    scores, categories = _score(settings, ModelRef(spec.label, "path", str(model_dir)))
    if not settings.ablation.keep_models:
        shutil.rmtree(model_dir, ignore_errors=True)
    return RunRecord(
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


def mlflow_store(settings: Settings) -> Settings:
    """The registry settings with the ablation's own MLflow experiment."""
    return with_overrides(settings, {"registry.experiment": settings.ablation.experiment})


def start_parent_run(settings: Settings, command: str) -> str:
    store = mlflow_store(settings)
    run_id = tracking.start_run(store, run_name="ablation", tags={"ablation.command": command})
    tracking.log_params(store, run_id, settings.stage_params("base", "ablation"))
    return run_id


def finish_parent_run(settings: Settings, run_id: str, summary: dict[str, Any], paths: dict[str, Path]) -> None:
    store = mlflow_store(settings)
    metrics = {
        f"{arm}/noise-{noise_key}/{m.replace('type:', '')}": cell[m]["mean"]
        for arm, by_noise in summary["cells"].items()
        for noise_key, cell in by_noise.items()
        for m in (OVERALL, *summary["tasks"])
    }
    tracking.log_metrics(store, run_id, metrics)
    tracking.log_artifact_file(store, run_id, paths["markdown"], "ablation/ablation.md")
    tracking.log_artifact_file(store, run_id, paths["chart"], "ablation/ablation.png")
    tracking.log_artifact_file(store, run_id, paths["json"], "ablation/ablation.json")
    tracking.end_run(store, run_id)
