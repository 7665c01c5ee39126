"""The GISTEmbed pipeline as a Prefect flow: version data -> fine-tune -> evaluate -> register + gate.

Tasks are thin wrappers over ``gist_core.stages``; they pass paths, ids and hashes, not models.
With PREFECT_API_URL unset the flow runs on a temporary in-process server; with it set, runs show
up in that server's UI. ``flows/deployments.py`` serves the flow for UI-triggered and scheduled runs.

A run ends in one of four clear states:
- Completed, message "gate passed ..." (the candidate was promoted, or recorded in dry-run mode);
- Completed named "Blocked", message "gate blocked: <reasons>" (registered, champion unchanged);
- Completed named "Unchanged", message "unchanged: same model as version N ..." (the candidate's
  weights hash is a registered version's: nothing evaluated or registered, the gate not asked;
  what a rerun with nothing changed ends in, since training then returns the kept model);
- Failed, message "stage <name> failed: <error>" (``preflight`` for bad parameters or inputs).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.states import Completed, Failed, State
from prefect.transactions import Transaction, transaction

from flows import caching, launch, report
from flows.parameters import PipelineParameters, apply_parameters, project_root
from gist_core import stages, versioning
from gist_core.config import Settings, load_settings, with_overrides
from gist_core.errors import RegistryError, VersioningError
from gist_core.gate import GateDecision
from gist_core.registry import promotion, tracking, versions
from gist_core.registry.versions import RegisteredVersion, VersionRecord
from gist_core.versioning import DataVersion

BLOCKED_STATE = "Blocked"
UNCHANGED_STATE = "Unchanged"


# DVC commands that talk to the remote; a failing `dvc repro` is the data or the code, never transient.
_DVC_REMOTE_COMMANDS = ("`dvc push", "`dvc pull", "`dvc fetch")


def is_transient(err: BaseException) -> bool:
    """MLflow and DVC-remote I/O that a retry may fix; bad input and failing stages are not."""
    if isinstance(err, VersioningError):
        return str(err).startswith(_DVC_REMOTE_COMMANDS)
    return isinstance(err, RegistryError | ConnectionError | TimeoutError)


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry only transient I/O (``is_transient``)."""
    try:
        state.result()
    except Exception as err:  # noqa: BLE001
        return is_transient(err)
    return False


def _data_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    return caching.data_cache_key(parameters["settings"])


@task(
    name="1-version-data",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_transient,
    cache_key_fn=_data_cache_key,
    persist_result=True,
)
def version_data(settings: Settings) -> DataVersion:
    """`dvc repro` + `dvc push` with this run's data params; cached while DVC's inputs are unchanged."""
    with caching.dvc_params_applied(settings):
        data = stages.run_version_data(settings)
    get_run_logger().info("data version %s (%s), remote %s", data.md5, data.path, data.remote)
    return data


@task(name="0-update-checkout", retries=2, retry_delay_seconds=[5, 30])
def update_checkout(root: str) -> dict[str, Any]:
    """git pull --ff-only + dvc pull, so a scheduled run trains on the latest committed data version."""
    update = versioning.update_checkout(Path(root))
    get_run_logger().info(
        "checkout %s: %s -> %s%s",
        update.upstream,
        update.before[:12],
        update.after[:12],
        "" if update.changed else " (unchanged)",
    )
    return update.to_dict()


@task(name="2-fine-tune")
def fine_tune(settings: Settings, data: DataVersion, run_id: str, overrides: dict[str, Any]) -> dict[str, Any]:
    if settings.orchestration.train_launcher == "torchrun":
        result = launch.run_torchrun(settings, run_id, overrides)
    else:
        result = stages.run_train(settings, data, run_id).to_dict()
    if result.get("reused"):
        get_run_logger().info(
            "reused the model trained with key %s (%d steps, final loss %.4f; trained in %.0f s): nothing trained",
            result["key"],
            result["steps"],
            result["train_loss"],
            result["seconds"],
        )
    else:
        get_run_logger().info(
            "trained %d steps, final loss %.4f, %.0f s", result["steps"], result["train_loss"], result["seconds"]
        )
    return result


@task(name="2-check-unchanged", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient)
def check_unchanged(settings: Settings, candidate_dir: str) -> VersionRecord | None:
    """The registered version with the candidate's weights hash, if any (then nothing else runs)."""
    found = stages.unchanged_version(settings, Path(candidate_dir))
    if found is not None:
        get_run_logger().info(stages.unchanged_text(found))
    return found


@task(name="3-fetch-champion", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient)
def fetch_champion(settings: Settings) -> str | None:
    """Download the current champion to score it beside the candidate (None: no champion, or gate.baseline base)."""
    folder = stages.run_fetch_champion(settings)
    return None if folder is None else str(folder)


@task(name="3-evaluate")
def evaluate(settings: Settings, candidate_dir: str, run_id: str, champion_dir: str | None) -> stages.EvalOutput:
    return stages.run_evaluate(settings, Path(candidate_dir), run_id, Path(champion_dir) if champion_dir else None)


def part_settings(settings: Settings, task_name: str) -> Settings:
    """Settings that score one entry of evaluate.tasks into the shared result cache."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", task_name)
    return with_overrides(
        settings,
        {
            "evaluate.tasks": [task_name],
            "evaluate.output": f"{settings.evaluate.cache_dir}/parts/{safe}.json",
            "gate.required_tasks": [],
        },
    )


@task(name="3-evaluate-task", task_run_name="3-evaluate-{task_name}")
def evaluate_task(settings: Settings, candidate_dir: str, champion_dir: str | None, task_name: str) -> dict[str, float]:
    """Score every model on one task; the result cache makes the merging ``3-evaluate`` cheap."""
    champion = Path(champion_dir) if champion_dir else None
    return stages.run_evaluate(part_settings(settings, task_name), Path(candidate_dir), None, champion).candidate


@task(name="4-register-and-gate", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient)
def register(
    settings: Settings, run_id: str, candidate_dir: str, evaluation: stages.EvalOutput, data: DataVersion
) -> tuple[RegisteredVersion, GateDecision]:
    return stages.run_register(settings, run_id, Path(candidate_dir), evaluation, data)


@register.on_rollback
def _revoke_promotion(txn: Transaction) -> None:
    version = txn.get("version", None)
    if version is not None:
        done = promotion.revoke_promotion(
            txn.get("settings"), version, txn.get("previous_champion", None), "a step after the gate failed"
        )
        get_run_logger().warning("rolled back the promotion of version %s: %s", version.version, "; ".join(done))


@task(name="4-publish-decision")
def publish_decision(
    settings: Settings,
    run_id: str,
    evaluation: stages.EvalOutput,
    decision: GateDecision,
    version: RegisteredVersion,
    data: DataVersion,
) -> dict[str, str]:
    """Artifacts for the UI, then a check that the registry holds what the gate decided."""
    links = report.publish(settings, run_id, evaluation, decision, version, data)
    champion = versions.champion_version(settings)
    if decision.promote and champion != version.version:
        raise RegistryError(f"gate promoted version {version.version} but champion is {champion}")
    return links


def evaluate_stage(settings: Settings, candidate_dir: str, run_id: str) -> stages.EvalOutput:
    """Fetch the champion, then score; with ``orchestration.parallel_evaluation`` one task per entry first."""
    champion_dir = fetch_champion(settings)
    if settings.orchestration.parallel_evaluation:
        parts = evaluate_task.map(
            unmapped(settings), unmapped(candidate_dir), unmapped(champion_dir), list(settings.evaluate.tasks)
        )
        parts.result()  # raise the first failing task's error here, named as this stage
    return evaluate(settings, candidate_dir, run_id, champion_dir)


def register_and_publish(
    settings: Settings, run_id: str, candidate_dir: str, evaluation: stages.EvalOutput, data: DataVersion
) -> tuple[RegisteredVersion, GateDecision]:
    """Gate, register and publish in one transaction: if publishing fails, the promotion is rolled back."""
    with transaction() as txn:
        txn.set("settings", settings)
        txn.set("previous_champion", versions.champion_version(settings))
        version, decision = register(settings, run_id, candidate_dir, evaluation, data)
        txn.set("version", version)
        publish_decision(settings, run_id, evaluation, decision, version, data)
    return version, decision


def final_state(result: stages.PipelineResult | stages.UnchangedResult) -> State:
    """Completed (gate passed or promoted without checks), Completed named Blocked or Unchanged, with the headline."""
    if isinstance(result, stages.UnchangedResult):
        return Completed(name=UNCHANGED_STATE, message=result.headline(), data=result)
    if result.decision.passed:
        return Completed(message=result.headline(), data=result)
    return Completed(name=BLOCKED_STATE, message=result.headline(), data=result)


@flow(name="gist-pipeline")
def gist_pipeline(params: PipelineParameters = PipelineParameters()) -> stages.PipelineResult | stages.UnchangedResult:
    """Run the four stages on the served project (``$GIST_PROJECT_DIR``, else the working directory).

    ``params`` override params.yaml for this run.
    """
    logger = get_run_logger()
    root = project_root()
    stage = "preflight"
    try:
        if params.update_checkout:
            stage = "0-update-checkout"
            update_checkout(str(root))
            stage = "preflight"
        settings, overrides = apply_parameters(load_settings(root), params)
        stages.preflight(settings)
        stage = "1-version-data"
        version_task = version_data
        if not settings.orchestration.cache_data_stage:
            version_task = version_data.with_options(refresh_cache=True)
        data = version_task(settings)
        stage = "start-mlflow-run"
        run_id = tracking.start_run(settings, run_name="gist-pipeline", tags={"data_version": data.md5})
        with tracking.failing_run_marks_failed(settings, run_id):
            stage = "2-fine-tune"
            trained = fine_tune(settings, data, run_id, overrides)
            same = check_unchanged(settings, trained["output_dir"])
            if same is None:
                stage = "3-evaluate"
                evaluation = evaluate_stage(settings, trained["output_dir"], run_id)
                stage = "4-register-and-gate"
                try:
                    version, decision = register_and_publish(settings, run_id, trained["output_dir"], evaluation, data)
                except stages.UnchangedModelError as err:  # registered by a concurrent run meanwhile
                    same = err.record
            if same is not None:
                unchanged = stages.UnchangedResult(data, run_id, trained, same)
                tracking.set_tags(settings, run_id, {"outcome": "unchanged", "same_as_version": same.version})
                report.publish_unchanged(settings, unchanged)
    except Exception as err:  # noqa: BLE001 - the run's state names the stage; callers get the error back
        logger.error("stage %s failed: %s: %s", stage, type(err).__name__, err)
        return Failed(message=f"stage {stage} failed: {type(err).__name__}: {err}", data=err)
    if same is not None:
        logger.info(unchanged.headline())
        return final_state(unchanged)
    result = stages.PipelineResult(data, run_id, trained, evaluation, decision, version)
    logger.info(result.headline())
    return final_state(result)
