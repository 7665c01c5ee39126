"""The GISTEmbed pipeline as a Prefect flow: version data -> fine-tune -> evaluate -> register + gate.

Tasks are thin wrappers over ``gist_core.stages``; they pass paths, ids and hashes, not models.
With PREFECT_API_URL unset the flow runs on a temporary in-process server; with it set, runs show
up in that server's UI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from gist_core import registry, stages
from gist_core.config import Settings, load_settings, with_overrides
from gist_core.errors import RegistryError, VersioningError
from gist_core.versioning import DataVersion


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only I/O that can fail transiently (registry, DVC remote), never bad input."""
    try:
        state.result()
    except (RegistryError, VersioningError, ConnectionError, TimeoutError):
        return True
    except Exception:  # noqa: BLE001
        return False
    return False


@task(name="1-version-data", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient)
def version_data(settings: Settings) -> DataVersion:
    data = stages.run_version_data(settings)
    get_run_logger().info("data version %s (%s), remote %s", data.md5, data.path, data.remote)
    return data


@task(name="2-fine-tune")
def fine_tune(settings: Settings, data: DataVersion, run_id: str) -> dict[str, Any]:
    result = stages.run_train(settings, data, run_id)
    get_run_logger().info("trained %d steps, final loss %.4f, %.0f s", result.steps, result.train_loss, result.seconds)
    return result.to_dict()


@task(name="3-evaluate")
def evaluate(settings: Settings, candidate_dir: str, run_id: str) -> stages.EvalOutput:
    return stages.run_evaluate(settings, Path(candidate_dir), run_id)


@task(name="4-register-and-gate", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient)
def register(
    settings: Settings, run_id: str, candidate_dir: str, evaluation: stages.EvalOutput, data: DataVersion
) -> tuple[registry.RegisteredVersion, Any]:
    version, decision = stages.run_register(settings, run_id, Path(candidate_dir), evaluation, data)
    create_markdown_artifact(
        key="gist-gate-decision",
        markdown=_report_markdown(settings, run_id, evaluation, decision, version, data),
        description="Per-task scores, deltas and the promotion gate's decision",
    )
    return version, decision


def _report_markdown(settings, run_id, evaluation, decision, version, data) -> str:  # noqa: ANN001
    rows = ["| task | candidate | base | delta |", "|---|---:|---:|---:|"]
    for task_name, score in evaluation.candidate.items():
        base = evaluation.baseline.get(task_name, float("nan"))
        rows.append(f"| {task_name} | {score:.4f} | {base:.4f} | {score - base:+.4f} |")
    rules = [f"- {'pass' if r.passed else 'FAIL'} `{r.rule}`: {r.detail}" for r in decision.rules]
    return "\n".join(
        [
            f"# {decision.summary()}",
            "",
            *rows,
            "",
            *rules,
            "",
            f"Model: `{version.model_uri}` aliases: {', '.join(version.aliases) or 'none'}",
            f"MLflow run: {registry.run_url(settings, run_id)}",
            f"Data version: `{data.md5}` ({data.path})",
        ]
    )


@flow(name="gist-pipeline")
def gist_pipeline(root: str = ".", overrides: dict[str, Any] | None = None) -> stages.PipelineResult:
    """Run the four stages on the project at ``root`` with optional dotted-key setting overrides."""
    settings = load_settings(Path(root))
    if overrides:
        settings = with_overrides(settings, overrides)
    stages.preflight(settings)
    data = version_data(settings)
    run_id = registry.start_run(settings, run_name="gist-pipeline", tags={"data_version": data.md5})
    with registry.failing_run_marks_failed(settings, run_id):
        trained = fine_tune(settings, data, run_id)
        evaluation = evaluate(settings, trained["output_dir"], run_id)
        version, decision = register(settings, run_id, trained["output_dir"], evaluation, data)
    result = stages.PipelineResult(data, run_id, trained, evaluation, decision, version)
    get_run_logger().info(result.headline())
    return result
