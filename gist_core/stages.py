"""Stage entry points: what ``gist <stage>``, the DVC stages and the Prefect tasks all call.

Each takes validated Settings and plain paths/ids, does one lifecycle step, and returns a small
value describing what it produced, so callers can pass paths and hashes rather than models.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gist_core import registry
from gist_core.config import Settings
from gist_core.data import DataReport, prepare_data, write_outputs
from gist_core.errors import DataError, EvaluationError
from gist_core.gate import GateDecision, decide
from gist_core.models import fingerprint, load_sentence_transformer, resolve_model
from gist_core.train import TrainResult, resolve_models, train
from gist_core.versioning import DataVersion, git_commit, version_data

log = logging.getLogger(__name__)


@dataclass
class EvalOutput:
    candidate: dict[str, float]
    baseline: dict[str, float]
    baseline_name: str
    summary: dict[str, Any]
    task_revisions: dict[str, str]
    mteb_version: str
    path: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, path: Path) -> EvalOutput:
        if not path.is_file():
            raise EvaluationError(f"{path}: no evaluation output; run `gist evaluate` first")
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as err:
            raise EvaluationError(f"{path}: not an evaluation output written by `gist evaluate`: {err}") from None


@dataclass
class PipelineResult:
    data_version: DataVersion
    run_id: str
    train: dict[str, Any]
    evaluation: EvalOutput
    decision: GateDecision
    version: registry.RegisteredVersion
    extra: dict[str, Any] = field(default_factory=dict)

    def headline(self) -> str:
        aliases = ", ".join(self.version.aliases) or "no alias"
        return (
            f"{self.decision.summary()}\n"
            f"registered {self.version.name} version {self.version.version} ({aliases}); "
            f"run {self.run_id}; data {self.data_version.md5}"
        )


def preflight(settings: Settings) -> None:
    """Cheap checks before any work or any write: models resolve, input files exist."""
    models_dir = settings.path(settings.base.models_dir)
    resolve_model(settings.base.student, models_dir, settings.root)
    if settings.train.loss == "gist":
        resolve_model(settings.base.guide, models_dir, settings.root)
    for source in settings.data.classification:
        if not settings.path(source.path).is_file():
            raise DataError(
                f"{settings.path(source.path)}: classification data file not found "
                f"(params.yaml data.classification '{source.name}')"
            )
    from gist_core.tasks import build_tasks

    build_tasks(settings.evaluate.tasks, settings.path(settings.evaluate.data_dir))


def run_data_stage(settings: Settings) -> DataReport:
    """Build the triplets and write them, the report and the skipped rows (the DVC stage's command)."""
    data, report, skipped = prepare_data(settings.data, settings.root, settings.base.seed)
    write_outputs(
        data,
        report,
        skipped,
        settings.path(settings.data.output),
        settings.path(settings.data.report),
        settings.path(settings.data.quarantine),
    )
    return report


def run_version_data(settings: Settings, push: bool = True) -> DataVersion:
    """`dvc repro` the data stage, push it to the remote, and return the data version."""
    return version_data(settings.root, settings.data.output, push=push)


def run_train(settings: Settings, data: DataVersion | None, run_id: str | None) -> TrainResult:
    """Fine-tune and log params and the loss curve to the run."""
    triplets = settings.path(data.path if data else settings.data.output)
    on_log = registry.metric_logger(settings, run_id) if run_id else None
    if run_id:
        registry.log_params(settings, run_id, settings.stage_params("base", "train"))
    result = train(settings, triplets, on_log=on_log)
    if run_id:
        registry.log_metrics(
            settings,
            run_id,
            {
                "train/final_loss": result.train_loss,
                "train/seconds": result.seconds,
                "train/steps": result.steps,
            },
        )
    return result


def _model_identity(path_or_ref: Any) -> tuple[str, str]:
    """(name, revision) for the result cache: the revision is a content hash of the weights."""
    if path_or_ref.is_local:
        return (f"gist-local/{Path(path_or_ref.location).name}", fingerprint(Path(path_or_ref.location)))
    return (path_or_ref.location, "hub-" + path_or_ref.location.replace("/", "__"))


def run_evaluate(settings: Settings, candidate_dir: Path, run_id: str | None) -> EvalOutput:
    """Score the base student and the candidate on the task pack; write scores and deltas."""
    from gist_core.evaluate import evaluate_model, scores_to_metrics, summarize
    from gist_core.models import ModelRef
    from gist_core.tasks import build_tasks

    cfg = settings.evaluate
    cache_dir = settings.path(cfg.cache_dir)
    tasks = build_tasks(cfg.tasks, settings.path(cfg.data_dir))
    base_ref, _ = resolve_models(settings)
    results = {}
    for role, ref in (("base", base_ref), ("candidate", ModelRef("candidate", "path", str(candidate_dir)))):
        name, revision = _model_identity(ref)
        if role == "candidate":
            name = f"gist-candidate/{settings.registry.model_name}"
        if cfg.max_seq_length is not None:
            revision += f"-len{cfg.max_seq_length}"  # cached results are keyed by (name, revision)
        model = load_sentence_transformer(ref, cfg.max_seq_length)
        results[role] = evaluate_model(
            model,
            model_name=name,
            model_revision=revision,
            tasks=tasks,
            cache_dir=cache_dir,
            batch_size=cfg.batch_size,
        )
    candidate, baseline = results["candidate"], results["base"]
    summary = summarize(candidate, baseline)
    first = next(iter(candidate.values()))
    out = EvalOutput(
        candidate=scores_to_metrics(candidate),
        baseline=scores_to_metrics(baseline),
        baseline_name="base",
        summary=summary,
        task_revisions={t: s.task_revision for t, s in candidate.items()},
        mteb_version=first.mteb_version,
        path=cfg.output,
    )
    path = settings.path(cfg.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out.to_dict(), indent=2, sort_keys=True) + "\n")
    if run_id:
        metrics = {f"eval/{t}": v for t, v in out.candidate.items()}
        metrics |= {f"base/{t}": v for t, v in out.baseline.items()}
        metrics |= {f"delta/{t}": out.candidate[t] - out.baseline[t] for t in out.candidate if t in out.baseline}
        registry.log_metrics(settings, run_id, metrics)
        registry.log_artifact_dict(settings, run_id, summary, "evaluation/summary.json")
    return out


def _description(settings: Settings, data: DataVersion, evaluation: EvalOutput, decision: GateDecision) -> str:
    lines = [
        f"GISTEmbed fine-tune of {settings.base.student} guided by {settings.base.guide} "
        f"({settings.train.loss} loss, {settings.train.max_steps} steps, batch {settings.train.batch_size}).",
        f"Data: {data.path} md5 {data.md5} ({', '.join(s.name for s in settings.data.classification)}).",
        "Scores (candidate / base / delta):",
    ]
    for task, score in evaluation.candidate.items():
        base = evaluation.baseline.get(task)
        delta = f"{score - base:+.4f}" if base is not None else "n/a"
        lines.append(f"- {task}: {score:.4f} / {base if base is None else f'{base:.4f}'} / {delta}")
    lines.append(decision.summary())
    return "\n".join(lines)


def run_register(
    settings: Settings,
    run_id: str,
    candidate_dir: Path,
    evaluation: EvalOutput,
    data: DataVersion,
) -> tuple[registry.RegisteredVersion, GateDecision]:
    """Decide with the gate, register the candidate with lineage tags, and apply the decision."""
    decision = decide(evaluation.candidate, evaluation.baseline, settings.gate, evaluation.baseline_name)
    tags = {
        "data_version": data.md5,
        "data_path": data.path,
        "git_commit": git_commit(settings.root),
        "student": settings.base.student,
        "guide": settings.base.guide,
        "loss": settings.train.loss,
        "mteb_version": evaluation.mteb_version,
        "task_revisions": json.dumps(evaluation.task_revisions, sort_keys=True),
        "gate.verdict": decision.verdict,
    }
    registry.set_tags(settings, run_id, tags)
    registry.log_artifact_dict(settings, run_id, decision.to_dict(), "gate/decision.json")
    registry.log_metrics(settings, run_id, {"gate/passed": float(decision.passed)})
    version = registry.register_model(
        settings, run_id, candidate_dir, tags, _description(settings, data, evaluation, decision)
    )
    try:
        version = registry.apply_decision(settings, version, decision)
    except Exception:
        registry.discard_version(settings, version)
        raise
    return version, decision
