"""What the Prefect UI shows for a run: the scores, the gate's decision, links and the data version.

Pure builders (tables, Markdown, links) beside one function that publishes them as artifacts, so
the content is testable without a Prefect server.
"""

from __future__ import annotations

import math
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from gist_core.config import Settings
from gist_core.gate import GateDecision
from gist_core.registry import client, tracking
from gist_core.registry.client import is_server
from gist_core.registry.versions import RegisteredVersion
from gist_core.stages import EvalOutput, UnchangedResult
from gist_core.tables import markdown_table
from gist_core.versioning import DataVersion

SCORES_KEY = "gist-scores"
RULES_KEY = "gist-gate-rules"
REPORT_KEY = "gist-report"
RUN_LINK_KEY = "gist-mlflow-run"
MODEL_LINK_KEY = "gist-model-version"


def _baselines(evaluation: EvalOutput) -> dict[str, dict[str, float]]:
    return evaluation.baselines or {evaluation.baseline_name: evaluation.baseline}


def score_rows(evaluation: EvalOutput) -> list[dict[str, Any]]:
    """One row per task: the candidate, each baseline scored (base, champion) and the deltas to them."""
    rows = []
    for task_name, score in evaluation.candidate.items():
        row: dict[str, Any] = {"task": task_name, "candidate": round(score, 4)}
        for role, scores in _baselines(evaluation).items():
            base = scores.get(task_name)
            row[role] = None if base is None else round(base, 4)
            row[f"delta vs {role}"] = None if base is None else round(score - base, 4)
        rows.append(row)
    return rows


def rule_rows(decision: GateDecision) -> list[dict[str, Any]]:
    return [
        {
            "rule": r.rule,
            "outcome": "pass" if r.passed else "FAIL",
            "observed": None if r.observed is None or math.isnan(r.observed) else round(r.observed, 4),
            "threshold": r.threshold,
            "detail": r.detail,
        }
        for r in decision.rules
    ]


def mlflow_links(settings: Settings, version: RegisteredVersion, experiment_id: str) -> dict[str, str]:
    """UI links to the run and the model version when MLflow is a server; empty for a local store."""
    uri = settings.tracking_uri
    if not is_server(uri):
        return {}
    return {
        RUN_LINK_KEY: tracking.ui_run_url(uri, experiment_id, version.run_id),
        MODEL_LINK_KEY: tracking.ui_version_url(uri, version.name, version.version),
    }


def _fmt(value: Any, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def report_markdown(
    settings: Settings,
    run_id: str,
    evaluation: EvalOutput,
    decision: GateDecision,
    version: RegisteredVersion,
    data: DataVersion,
    links: dict[str, str],
) -> str:
    rows = score_rows(evaluation)
    columns = list(rows[0]) if rows else ["task", "candidate"]
    lines = [f"# {decision.summary()}", ""]
    lines += markdown_table(
        columns,
        ([row["task"]] + [_fmt(row[c], signed=c.startswith("delta")) for c in columns[1:]] for row in rows),
        align=["left"] + ["right"] * (len(columns) - 1),
    )
    lines += ["", f"## Gate (mode `{decision.mode}`, baseline `{decision.baseline_label}`)", ""]
    if decision.rules:
        lines += markdown_table(
            ["rule", "outcome", "detail"], ([f"`{r['rule']}`", r["outcome"], r["detail"]] for r in rule_rows(decision))
        )
    else:
        lines.append("No rules applied (gate disabled).")
    run_ref = links.get(RUN_LINK_KEY)
    model_ref = links.get(MODEL_LINK_KEY)
    lines += [
        "",
        "## Lineage",
        "",
        f"- Model version: `{version.model_uri}`, aliases: {', '.join(version.aliases) or 'none'}"
        + (f" ([open]({model_ref}))" if model_ref else ""),
        f"- MLflow run: `{run_id}`" + (f" ([open]({run_ref}))" if run_ref else f" in `{settings.tracking_uri}`"),
        f"- Data version: `{data.md5}` (`{data.path}`, DVC remote `{data.remote or 'none'}`)",
        f"- Student `{settings.base.student}`, guide `{settings.base.guide}`, "
        f"{settings.train.length_description} at batch {settings.train.batch_size}, lr {settings.train.learning_rate}",
    ]
    return "\n".join(lines)


def publish(
    settings: Settings,
    run_id: str,
    evaluation: EvalOutput,
    decision: GateDecision,
    version: RegisteredVersion,
    data: DataVersion,
) -> dict[str, str]:
    """Create the run's artifacts; returns the links that were published."""
    experiment_id = client.client(settings).get_run(run_id).info.experiment_id
    links = mlflow_links(settings, version, experiment_id)
    create_table_artifact(
        key=SCORES_KEY, table=score_rows(evaluation), description="Per-task MTEB main scores and deltas"
    )
    create_table_artifact(key=RULES_KEY, table=rule_rows(decision), description=decision.summary())
    create_markdown_artifact(
        key=REPORT_KEY,
        markdown=report_markdown(settings, run_id, evaluation, decision, version, data, links),
        description="Scores, the promotion gate's decision, lineage",
    )
    for key, link in links.items():
        text = "MLflow run" if key == RUN_LINK_KEY else f"{version.name} version {version.version}"
        create_link_artifact(key=key, link=link, link_text=text)
    return links


def unchanged_markdown(settings: Settings, result: UnchangedResult) -> str:
    """What the UI shows for a run whose candidate is an already registered model."""
    record = result.version
    return "\n".join(
        [
            f"# {result.headline().splitlines()[0]}",
            "",
            f"The candidate's weights hash (`{record.fingerprint}`) is that of "
            f"`models:/{record.name}/{record.version}`: no version was created and the promotion gate was not asked.",
            "",
            "## Lineage",
            "",
            f"- Same model as: version {record.version}, registered by run `{record.run_id}`, "
            f"aliases: {', '.join(record.aliases) or 'none'}",
            f"- This run: `{result.run_id}` in `{settings.tracking_uri}`; training "
            + ("reused the kept model" if result.train.get("reused") else "ran and produced the same weights")
            + f" (training key `{result.train.get('key') or 'unknown'}`)",
            f"- Data version: `{result.data_version.md5}` (`{result.data_version.path}`)",
        ]
    )


def publish_unchanged(settings: Settings, result: UnchangedResult) -> None:
    create_markdown_artifact(
        key=REPORT_KEY,
        markdown=unchanged_markdown(settings, result),
        description="Unchanged: the candidate is a registered version's model",
    )
