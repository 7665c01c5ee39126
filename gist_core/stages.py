"""Stage entry points: what ``gist <stage>``, the DVC stages and the Prefect tasks all call.

Each takes validated Settings and plain paths/ids, does one lifecycle step, and returns a small
value describing what it produced, so callers can pass paths and hashes rather than models.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from gist_core.catalogue import HUB_PREFIX
from gist_core.config import Settings
from gist_core.data.audit import DataReport
from gist_core.data.mine import Mined
from gist_core.data.stage import data_stage, embed_stage, mine_stage
from gist_core.errors import DataError, EvaluationError, GistError, RegistryError
from gist_core.evaluation.evaluate import cached_results, score_model
from gist_core.evaluation.summary import plot_deltas, scores_to_metrics, summarize, summary_markdown, summary_metrics
from gist_core.evaluation.tasks import build_tasks
from gist_core.gate import GateDecision, Scorecard, choose_baseline, decide
from gist_core.models import (
    ModelRef,
    ensure_available,
    fingerprint,
    resolve_model,
)
from gist_core.registry import card, promotion, serving, tracking, versions
from gist_core.registry.tags import GATE_BASELINE_VERSION_TAG, TAG_PREFIX
from gist_core.registry.versions import RegisteredVersion, VersionRecord
from gist_core.training import guide_cache
from gist_core.training.runtime import is_main_process
from gist_core.training.trainer import TRAIN_METRICS_FILE, TrainResult, train
from gist_core.versioning import DataVersion, git_commit, version_data

log = logging.getLogger(__name__)


@dataclass
class EvalOutput:
    """What `gist evaluate` wrote to reports/eval.json: main scores per task, per model, and the summary.

    ``baseline`` is the base student's scores (``baseline_name`` "base"); ``baselines`` holds every
    baseline scored: "base" and, when a champion folder was given, "champion". ``summary`` is
    ``gist_core.evaluation.summary.summarize``'s (per task, per category, overall; deltas per baseline).
    """

    candidate: dict[str, float]
    baseline: dict[str, float]
    baseline_name: str
    summary: dict[str, Any]
    task_revisions: dict[str, str]
    mteb_version: str
    path: str
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    categories: dict[str, str] = field(default_factory=dict)  # task -> MTEB type (STS, Classification, ...)
    models: dict[str, dict[str, str]] = field(default_factory=dict)  # role -> ref, cache name, revision, fingerprint
    # precision, max_seq_length ("model": each model's own), library versions ({}: unknown, an older file)
    eval_settings: dict[str, str] = field(default_factory=dict)

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


class UnchangedModelError(GistError):
    """The candidate's weights are those of a registered version: nothing is registered."""

    def __init__(self, record: VersionRecord) -> None:
        self.record = record
        super().__init__(unchanged_text(record))


def unchanged_text(record: VersionRecord) -> str:
    verdict = record.tags.get(TAG_PREFIX + "gate.verdict")
    aliases = f", {', '.join(record.aliases)}" if record.aliases else ""
    return f"unchanged: same model as version {record.version} ({verdict or 'not decided'}{aliases})"


@dataclass
class UnchangedResult:
    """A run whose candidate is a registered version's model: no version created, the gate not asked."""

    data_version: DataVersion
    run_id: str
    train: dict[str, Any]
    version: VersionRecord

    def headline(self) -> str:
        reused = " (training reused)" if self.train.get("reused") else ""
        return (
            f"{unchanged_text(self.version)}; nothing registered{reused}\n"
            f"run {self.run_id}; data {self.data_version.md5}"
        )


@dataclass
class PipelineResult:
    data_version: DataVersion
    run_id: str
    train: dict[str, Any]
    evaluation: EvalOutput
    decision: GateDecision
    version: RegisteredVersion
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
    data = settings.data
    mines_with_guide = data.mining.positive_strategy == "guide_topk" or data.audit.guide_verdicts
    if settings.train.loss == "gist" or mines_with_guide:
        resolve_model(settings.base.guide, models_dir, settings.root)
    for source in settings.data.classification:
        if not settings.path(source.path).is_file():
            raise DataError(
                f"{settings.path(source.path)}: classification data file not found "
                f"(params.yaml data.classification '{source.name}')"
            )
    cfg = settings.evaluate
    build_tasks(cfg.tasks, settings.path(cfg.data_dir), custom_tasks=cfg.custom_tasks, root=settings.root)


def run_embed_stage(settings: Settings) -> dict[str, Any]:
    """Embed every text the data stages show the guide into ``data.embeddings`` (the DVC `embed` stage's command)."""
    return embed_stage(settings)


def run_mine_stage(settings: Settings) -> Mined:
    """Mine triplets from the classification sources into ``data.mined`` (the DVC `mine` stage's command)."""
    return mine_stage(settings)


def run_data_stage(settings: Settings, mine: bool = True) -> DataReport:
    """Build the training triplets, the data report and the removed rows (the DVC `data` stage: ``mine=False``).

    With ``mine`` the mining step runs first; without it, the mined triplets of the last `mine` run are used.
    """
    return data_stage(settings, mine=mine)


def run_version_data(settings: Settings, push: bool = True) -> DataVersion:
    """`dvc repro` the data stage, push it to the remote, and return the data version.

    When training uses the guide-embedding cache, its DVC stage (``guide_cache``) is reproduced and pushed too.
    """
    data = version_data(settings.root, settings.data.output, push=push)
    guide_cache.version_guide_cache(settings, push=push)
    return data


def run_guide_cache(settings: Settings) -> dict[str, Any]:
    """Embed every training text with the frozen guide once (the DVC `guide_cache` stage's command)."""
    return guide_cache.build_for_settings(settings)


def run_train(settings: Settings, data: DataVersion | None, run_id: str | None) -> TrainResult:
    """Fine-tune and log params and the loss curve to the run (from rank 0 only, under torchrun)."""
    if not is_main_process():
        run_id = None
    triplets = settings.path(data.path if data else settings.data.output)
    on_log = tracking.metric_logger(settings, run_id) if run_id else None
    if run_id:
        tracking.log_params(settings, run_id, settings.stage_params("base", "train"))
    result = train(settings, triplets, on_log=on_log)
    if run_id:
        if result.reused and on_log is not None:  # the loss curve of the run that trained it, as if trained now
            for entry in result.history:
                if "step" in entry:
                    on_log({k: v for k, v in entry.items() if k != "step"}, int(entry["step"]))
        tracking.set_tags(settings, run_id, {"train_key": result.key, "train.reused": str(result.reused).lower()})
        tracking.log_metrics(
            settings,
            run_id,
            {
                "train/final_loss": result.train_loss,
                "train/seconds": result.seconds,
                "train/steps": result.steps,
                "train/reused": float(result.reused),
            },
        )
    return result


def eval_report_paths(settings: Settings) -> dict[str, Path]:
    """Where `gist evaluate` writes its outputs: the JSON (evaluate.output), a Markdown table, a PNG chart."""
    path = settings.path(settings.evaluate.output)
    return {
        "json": path,
        "markdown": path.with_suffix(".md"),
        "chart": path.with_name(path.stem + "_deltas.png"),
    }


def run_evaluate(
    settings: Settings, candidate_dir: Path, run_id: str | None, champion_dir: Path | None = None
) -> EvalOutput:
    """Score the base student, the champion (when its folder is given) and the candidate; write the comparison.

    Each model's results come from the cache when its content hash, the task revisions and the
    mteb version are unchanged, so the base model and the champion are scored once.
    """
    cfg = settings.evaluate
    tasks = build_tasks(cfg.tasks, settings.path(cfg.data_dir), custom_tasks=cfg.custom_tasks, root=settings.root)
    student = resolve_model(settings.base.student, settings.path(settings.base.models_dir), settings.root)
    refs = {"base": ensure_available(student)}
    if champion_dir is not None:
        if not Path(champion_dir).is_dir():
            raise EvaluationError(f"{champion_dir}: champion model folder not found")
        refs["champion"] = ModelRef("champion", "path", str(champion_dir))
    refs["candidate"] = ModelRef("candidate", "path", str(candidate_dir))
    scored = {
        role: score_model(
            ref,
            tasks,
            cache_dir=settings.path(cfg.cache_dir),
            batch_size=cfg.batch_size,
            max_seq_length=cfg.max_seq_length,
            show_progress_bar=cfg.progress_bar,
            precision=cfg.precision,
        )
        for role, ref in refs.items()
    }
    candidate = scored["candidate"].scores
    baselines = {role: s.scores for role, s in scored.items() if role != "candidate"}
    summary = summarize(candidate, baselines)
    out = EvalOutput(
        candidate=scores_to_metrics(candidate),
        baseline=scores_to_metrics(baselines["base"]),
        baseline_name="base",
        summary=summary,
        task_revisions={t: s.task_revision for t, s in candidate.items()},
        mteb_version=next(iter(candidate.values())).mteb_version,
        path=cfg.output,
        baselines={role: scores_to_metrics(scores) for role, scores in baselines.items()},
        categories={t: s.category for t, s in candidate.items()},
        models={role: s.identity() for role, s in scored.items()},
        eval_settings=dict(scored["candidate"].settings),
    )
    paths = eval_report_paths(settings)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(out.to_dict(), indent=2, sort_keys=True) + "\n")
    markdown = summary_markdown(summary, title=f"Evaluation of {settings.registry.model_name} candidate")
    paths["markdown"].write_text(markdown)
    plot_deltas(summary, paths["chart"])
    if run_id:
        tracking.log_metrics(settings, run_id, summary_metrics(summary))
        tracking.log_artifact_dict(settings, run_id, summary, "evaluation/summary.json")
        tracking.log_artifact_text(settings, run_id, markdown, "evaluation/summary.md")
        tracking.log_artifact_file(settings, run_id, paths["chart"], "evaluation/deltas.png")
    return out


def run_fetch_champion(settings: Settings) -> Path | None:
    """Download the current champion into ``registry.champion_dir`` so ``run_evaluate`` can score it.

    Returns the folder to pass as ``run_evaluate(..., champion_dir=...)``, or None when there is no
    champion or the gate compares with the base model only. Beside the folder, ``<folder>.json``
    records the version and the content hash of what was downloaded, so ``run_register`` can tell
    which registered version the evaluation's "champion" scores belong to.
    """
    dest = settings.path(settings.registry.champion_dir)
    marker = _champion_marker(dest)
    record = versions.current_champion(settings) if settings.gate.baseline == "champion" else None
    if record is None:
        shutil.rmtree(dest, ignore_errors=True)
        marker.unlink(missing_ok=True)
        return None
    serving.download_version(settings, record.version, dest, record.name)
    marker.write_text(
        json.dumps({"name": record.name, "version": record.version, "revision": fingerprint(dest)}, indent=2) + "\n"
    )
    return dest


def _champion_marker(champion_dir: Path) -> Path:
    return champion_dir.with_name(champion_dir.name + ".json")


def _scored_champion_version(settings: Settings, evaluation: EvalOutput) -> str | None:
    """The registered version whose files the evaluation scored as "champion" (None: unknown)."""
    scored = evaluation.models.get("champion") or {}
    try:
        marker = json.loads(_champion_marker(settings.path(settings.registry.champion_dir)).read_text())
    except (OSError, ValueError):
        return None
    # the cache revision is the content hash plus suffixes (-len<N>, -bf16, -lib<hash>); newer outputs
    # also record the content hash on its own
    scored_fingerprint = scored.get("fingerprint") or str(scored.get("revision", "")).split("-")[0]
    if marker.get("revision") and scored_fingerprint == marker["revision"]:
        return str(marker.get("version"))
    return None


def _candidate_scorecard(settings: Settings, evaluation: EvalOutput) -> Scorecard:
    """The candidate's scores and what they were computed with; a configured task left unscored failed."""
    unscored = [t for t in settings.evaluate.tasks if not t.startswith(HUB_PREFIX) and t not in evaluation.candidate]
    return Scorecard(
        "candidate",
        evaluation.candidate,
        task_revisions=evaluation.task_revisions,
        mteb_version=evaluation.mteb_version,
        failed_tasks=tuple(unscored),
        eval_settings=evaluation.eval_settings or None,
    )


def gate_decision(settings: Settings, evaluation: EvalOutput, champion: VersionRecord | None) -> GateDecision:
    """The gate's decision for an evaluation, against ``champion`` when there is one (else the base model).

    The champion's scores are the ones this evaluation computed when it scored that very version
    (see ``run_fetch_champion``), else the scores recorded on the version at its registration;
    the ``comparable`` rule then checks its recorded task revisions and mteb version.
    """
    candidate = _candidate_scorecard(settings, evaluation)
    baselines = evaluation.baselines
    same_run = evaluation.eval_settings or None  # baselines scored in this run: the candidate's settings
    base = Scorecard(
        "base",
        baselines.get("base") or evaluation.baseline,
        evaluation.task_revisions,
        evaluation.mteb_version,
        eval_settings=same_run,
    )
    champ = None
    if champion is not None:
        if "champion" in baselines and _scored_champion_version(settings, evaluation) == champion.version:
            champ = Scorecard(
                "champion",
                baselines["champion"],
                evaluation.task_revisions,
                evaluation.mteb_version,
                version=champion.version,
                eval_settings=same_run,
            )
        else:
            champ = versions.champion_scorecard(settings, champion)
    categories = dict(champion.categories if champion else {})
    categories |= evaluation.categories
    baseline = choose_baseline(base, champ, settings.gate)
    return decide(candidate, baseline, settings.gate, categories=categories)


def _description(
    settings: Settings, data: DataVersion, evaluation: EvalOutput, decision: GateDecision, commit: str
) -> str:
    baselines = evaluation.baselines or {"base": evaluation.baseline}
    names = list(baselines)
    lines = [
        f"GISTEmbed fine-tune of {settings.base.student} guided by {settings.base.guide} "
        f"({settings.train.loss} loss, {settings.train.length_description}, batch {settings.train.batch_size}, "
        f"lr {settings.train.learning_rate}).",
        f"Data: {data.path} md5 {data.md5} ({', '.join(s.name for s in settings.data.classification)}).",
        f"Params hash (base, data, train): {settings.params_hash()}; git commit {commit}.",
        f"Evaluated with mteb {evaluation.mteb_version}. Scores (candidate / {' / '.join(names)}):",
    ]
    for task, score in evaluation.candidate.items():
        others = " / ".join(f"{baselines[n][task]:.4f}" if task in baselines[n] else "n/a" for n in names)
        lines.append(f"- {task}: {score:.4f} / {others}")
    lines.append(f"Gate at registration: {decision.summary()}")
    return "\n".join(lines)


def unchanged_version(settings: Settings, candidate_dir: Path) -> VersionRecord | None:
    """The registered version whose weights hash equals the candidate's (None: a new model)."""
    return versions.same_model_version(settings, fingerprint(candidate_dir))


def run_register(
    settings: Settings,
    run_id: str,
    candidate_dir: Path,
    evaluation: EvalOutput,
    data: DataVersion,
) -> tuple[RegisteredVersion, GateDecision]:
    """Decide with the gate, register the candidate with lineage tags, apply the decision, log its model card.

    The decision is made against the current champion (or the base model); the version is created
    with its lineage and scores in one call; ``registry.promote`` then moves the aliases as a
    compare-and-set, deciding again if the champion moved meanwhile. Returns the final decision.

    Idempotent per run: when this MLflow run already registered the candidate (a retried step), that
    version is finished (its promotion applied, or its recorded decision returned) instead of a new
    one created.

    Raises:
        UnchangedModelError: another run registered the same weights (``unchanged_version``).
    """
    weights = fingerprint(candidate_dir)  # a local folder's model_fingerprint
    scored = (evaluation.models.get("candidate") or {}).get("fingerprint")
    if scored and scored != weights:
        raise EvaluationError(
            f"{evaluation.path} scored another candidate (weights {scored[:12]}) than {candidate_dir} "
            f"({weights[:12]}): run `gist evaluate` for this candidate first"
        )
    existing = versions.run_version(settings, run_id)
    if existing is not None and existing.fingerprint not in (None, weights):
        raise RegistryError(
            f"run {run_id} already registered version {existing.version} with other weights; "
            "register another model from a new run"
        )
    if existing is None and (same := versions.same_model_version(settings, weights)) is not None:
        raise UnchangedModelError(same)
    commit = git_commit(settings.root)

    def redecide(record: VersionRecord | None) -> GateDecision:
        return gate_decision(settings, evaluation, record)

    if existing is not None and not existing.pending:
        log.info("run %s already registered and decided version %s", run_id, existing.version)
        baseline = existing.tags.get(GATE_BASELINE_VERSION_TAG)
        decision = redecide(versions.get_version(settings, baseline) if baseline else None)
        aliases = versions.version_aliases(settings, existing.version)
        version = RegisteredVersion(existing.name, existing.version, run_id, aliases, _model_uri(existing))
    else:
        champion = versions.current_champion(settings)
        decision = gate_decision(settings, evaluation, champion)
        if existing is None:
            tags = _version_tags(settings, evaluation, data, commit, candidate_dir, weights)
            tracking.set_tags(settings, run_id, tags)
            description = _description(settings, data, evaluation, decision, commit)
            version = versions.register_model(settings, run_id, candidate_dir, tags, description)
        else:
            log.warning("run %s left version %s pending: finishing its promotion", run_id, existing.version)
            version = RegisteredVersion(existing.name, existing.version, run_id, (), _model_uri(existing))
        try:
            expected = champion.version if champion else None
            promoted = promotion.promote(settings, version, decision, expected_champion=expected, redecide=redecide)
        except RegistryError:
            raise  # the version stays pending: a retry of this step finishes it, else `gist registry cleanup-pending`
        except Exception:
            _discard_unless_champion(settings, version)
            raise
        version, decision = promoted.version, promoted.decision
    text = model_card(settings, run_id, candidate_dir, evaluation, data, version, decision, weights, commit)
    card.log_card(settings, version.version, text, version.name)
    tracking.set_tags(settings, run_id, {"gate.verdict": decision.verdict})
    tracking.log_metrics(settings, run_id, {"gate/passed": float(decision.passed)})
    return version, decision


def _model_uri(record: VersionRecord) -> str:
    return f"models:/{record.name}/{record.version}"


def _train_summary(candidate_dir: Path) -> dict[str, Any]:
    """The trainer's ``train_metrics.json`` beside the candidate's weights ({} when absent)."""
    try:
        return json.loads((Path(candidate_dir) / TRAIN_METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _version_tags(
    settings: Settings, evaluation: EvalOutput, data: DataVersion, commit: str, candidate_dir: Path, weights: str
) -> dict[str, Any]:
    """A version's lineage: data, code, params, models, scores and what they were computed with."""
    return {
        "data_version": data.md5,
        "data_path": data.path,
        "git_commit": commit,
        "params_hash": settings.params_hash(),
        "student": settings.base.student,
        "guide": settings.base.guide,
        "loss": settings.train.loss,
        "model_fingerprint": weights,
        "train_key": _train_summary(candidate_dir).get("key") or "unknown",
        "mteb_version": evaluation.mteb_version,
        "task_revisions": json.dumps(evaluation.task_revisions, sort_keys=True),
        "eval_settings": json.dumps(evaluation.eval_settings, sort_keys=True),
        "scores": json.dumps(evaluation.candidate, sort_keys=True),
        "categories": json.dumps(evaluation.categories, sort_keys=True),
    }


def model_card(
    settings: Settings,
    run_id: str,
    candidate_dir: Path,
    evaluation: EvalOutput,
    data: DataVersion,
    version: RegisteredVersion,
    decision: GateDecision,
    weights: str,
    commit: str,
) -> str:
    """The registered version's model card (``gist_core.registry.card``), from this run's real values."""
    cfg = settings.evaluate
    tasks = []
    if evaluation.models:  # mteb's results are read back from the result cache for the card's metadata
        tasks = build_tasks(cfg.tasks, settings.path(cfg.data_dir), custom_tasks=cfg.custom_tasks, root=settings.root)
    cache_dir = settings.path(cfg.cache_dir)
    results: dict[str, list[Any]] = {}
    recorded: dict[str, dict[str, float]] = {}

    def add(label: str, role: str, scores: dict[str, float]) -> None:
        identity = evaluation.models.get(role)
        found = cached_results(cache_dir, identity, tasks) if identity else []
        if found:
            results[label] = found
        elif scores:
            recorded[label] = scores

    add(card.THIS, "candidate", evaluation.candidate)
    add("base", "base", evaluation.baselines.get("base") or evaluation.baseline)
    scored_champion = _scored_champion_version(settings, evaluation)
    champion = decision.baseline_version or scored_champion
    if champion is not None:
        if champion == scored_champion:
            add(f"champion v{champion}", "champion", evaluation.baselines.get("champion", {}))
        else:
            add(f"champion v{champion}", "", dict(versions.get_version(settings, champion).scorecard().scores))
    summary = _train_summary(candidate_dir)
    inputs = card.from_run(
        settings,
        version=(version.name, version.version, version.aliases),
        decision=decision,
        run_id=run_id,
        data=(data.md5, data.path, _triplets_per_task(settings.path(data.path))),
        lineage={"git_commit": commit, "weights_hash": weights, "train_key": summary.get("key")},
        trained=summary,
        evaluation=evaluation.to_dict(),
        results=results,
        recorded=recorded,
    )
    return card.render(inputs)


def _triplets_per_task(path: Path) -> dict[str, int]:
    """Triplets per task of the data version trained on ({} when the file is not here)."""
    if not path.is_file():
        return {}
    counts = pq.read_table(path, columns=["task_name"]).column("task_name").value_counts()  # one column, not the texts
    return {str(c["values"]): int(c["counts"]) for c in sorted(counts.to_pylist(), key=lambda c: str(c["values"]))}


def _discard_unless_champion(settings: Settings, version: RegisteredVersion) -> None:
    """After a failed promotion (not a registry error): delete the version, unless it already became champion."""
    try:
        if versions.champion_version(settings, version.name) == version.version:
            return  # promoted before the failure: keep it (its audit trail may be incomplete)
    except RegistryError:
        return  # MLflow is down: the version stays, tagged gist.promotion=pending
    versions.discard_version(settings, version)
