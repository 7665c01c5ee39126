"""The ablation as a Prefect flow: prepare the data variants, one task per run, then the report.

Thin over ``gist_core.ablation``: the tasks pass settings, specs and small records. Runs execute one
after another (a 2-core machine gains nothing from running two trainings at once); each stores its
result, so a rerun with the same settings skips the runs already done. The report is a Markdown
artifact in the Prefect UI and, with the chart, an artifact of the MLflow parent run.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.parameters import plain_form, project_root
from gist_core import stages, versioning
from gist_core.ablation import plan, runner
from gist_core.ablation import report as ablation_report
from gist_core.ablation.plan import RunRecord, RunSpec
from gist_core.config import Settings, load_settings, with_overrides
from gist_core.errors import ConfigError
from gist_core.registry import tracking

REPORT_KEY = "gist-ablation"


class AblationParameters(BaseModel):
    """Overrides of params.yaml's ``ablation`` section for one run (what the Prefect UI may send)."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="GIST ablation run", json_schema_extra=plain_form)

    quick: bool = Field(False, description="a few-minute smoke run (2 steps, 2 seeds, 1 task); not for conclusions")
    arms: list[str] | None = Field(None, min_length=1, description="names of ablation.arms to run (a subset)")
    seeds: list[int] | None = Field(None, min_length=1, max_length=20, description="ablation.seeds")
    noise_levels: list[float] | None = Field(None, min_length=1, max_length=10, description="ablation.noise_levels")
    max_steps: int | None = Field(None, ge=1, le=1_000_000, description="ablation.max_steps")
    overrides: dict[str, Any] = Field(default_factory=dict, description="other settings, dotted key -> value")

    @model_validator(mode="after")
    def _dotted(self) -> AblationParameters:
        for key in self.overrides:
            if "." not in key or not all(key.split(".")):
                raise ValueError(f"overrides: {key!r} is not a dotted setting key such as ablation.batch_size")
        return self

    def to_overrides(self, settings: Settings) -> dict[str, Any]:
        out: dict[str, Any] = dict(plan.QUICK_OVERRIDES) if self.quick else {}
        if self.arms is not None:
            known = {a.name: a for a in settings.ablation.arms}
            unknown = [n for n in self.arms if n not in known]
            if unknown:
                raise ConfigError(f"arms: unknown {unknown}; params.yaml ablation.arms has: {', '.join(known)}")
            out["ablation.arms"] = [known[n].model_dump(mode="json") for n in self.arms]
            out["ablation.compare"] = [
                list(pair) for pair in settings.ablation.compare if all(n in self.arms for n in pair)
            ]
        for name in ("seeds", "noise_levels", "max_steps"):
            value = getattr(self, name)
            if value is not None:
                out[f"ablation.{name}"] = value
        return out | self.overrides


def apply_ablation_parameters(settings: Settings, params: AblationParameters) -> Settings:
    return with_overrides(settings, params.to_overrides(settings))


@task(name="1-version-data")
def version_data(settings: Settings) -> str:
    """The data stage's output under DVC (``dvc repro data``; not pushed: the ablation publishes nothing).

    Not the guide_cache stage: the ablation reuses that cache when it fits its data, else builds its own.
    """
    return versioning.version_data(settings.root, settings.data.output, push=False).md5


@task(name="1-prepare-ablation-data")
def prepare(settings: Settings) -> dict[str, dict[str, Any]]:
    data = runner.prepare_data(settings)
    for variant, info in data.items():
        get_run_logger().info("data %s: %s (%d noisy copies)", variant, info["clean"], len(info["noise"]))
    return data


@task(name="2-train-and-evaluate", task_run_name="2-{spec.arm}-noise-{spec.noise}-seed-{spec.seed}")
def run_one(settings: Settings, spec: RunSpec, data: dict[str, dict[str, Any]], parent_run_id: str) -> RunRecord:
    record = runner.execute_run(settings, spec, data, parent_run_id)
    mean = sum(record.scores.values()) / len(record.scores)
    get_run_logger().info("%s: mean score %.4f %s", spec.label, mean, record.scores)
    return record


@task(name="3-report")
def report(
    settings: Settings,
    records: list[RunRecord],
    data: dict[str, dict[str, Any]],
    parent: str,
    command: str,
    started: float,
) -> dict[str, str]:
    summary = ablation_report.summarize(records, settings, data)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    reused = sum(1 for r in records if r.reused)
    when += f", {(time.time() - started) / 60:.1f} min on {os.cpu_count()} CPU cores"
    when += f", {reused} of {len(records)} runs reused from an earlier invocation" if reused else ""
    paths = ablation_report.write_report(summary, settings, command, when)
    runner.finish_parent_run(settings, parent, summary, paths)
    create_markdown_artifact(
        key=REPORT_KEY, markdown=paths["markdown"].read_text(), description="Ablation: scores per arm and noise level"
    )
    return {name: str(path) for name, path in paths.items()}


@flow(name="gist-ablation")
def gist_ablation(params: AblationParameters = AblationParameters(), command: str = "gist ablation") -> dict[str, str]:
    """Train and score every arm, seed and noise level of ``ablation`` in params.yaml; report them side by side."""
    started = time.time()
    settings = apply_ablation_parameters(load_settings(project_root()), params)
    stages.preflight(settings)  # bad parameters fail here, before any work
    plan.check(settings)
    version_data(settings)
    data = prepare(settings)
    parent = runner.start_parent_run(settings, command)
    with tracking.failing_run_marks_failed(runner.mlflow_store(settings), parent, finish=False):
        records = [run_one(settings, spec, data, parent) for spec in plan.plan(settings)]
    return report(settings, records, data, parent, command, started)
