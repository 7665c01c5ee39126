"""The pipeline flow's parameters: what a person may change for one run from the Prefect UI.

Prefect turns ``PipelineParameters`` into the deployment's parameter schema, so the UI shows a form
and the server rejects a run whose values break it (a negative step count, an unknown gate mode, an
unexpected field) when the run is created. Everything else is checked when the run starts, before
any work: the parameters become dotted-key overrides (``train.max_steps``) applied to params.yaml
with ``gist_core.config.with_overrides``, which re-validates the whole settings, and then the same
preflight as ``gist pipeline`` resolves the models and input files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gist_core.config import GateMode, Settings, with_overrides
from gist_core.errors import ConfigError

# The project a flow run works on: set by `gist serve` / `gist pipeline --root`, else the working
# directory (a work pool deployment's pull step moves there). Deliberately not a flow parameter:
# a UI user cannot point a run at another folder of the worker.
PROJECT_ENV = "GIST_PROJECT_DIR"

# params.yaml's values, shown in the form's descriptions while deployments are built (never sent).
_CURRENT_VALUES: ContextVar[Mapping[str, Any] | None] = ContextVar("gist_form_current_values", default=None)


def project_root() -> Path:
    """The checkout a flow run works on: ``$GIST_PROJECT_DIR``, else the working directory."""
    return Path(os.environ.get(PROJECT_ENV) or Path.cwd()).resolve()


@contextmanager
def showing_current_values(values: Mapping[str, Any]) -> Iterator[None]:
    """Schemas built in this block say each field's current value: "(params.yaml: 30)"."""
    token = _CURRENT_VALUES.set(dict(values))
    try:
        yield
    finally:
        _CURRENT_VALUES.reset(token)


def plain_form(schema: dict[str, Any], cls: type | None = None) -> None:
    """Show optional overrides as plain fields in the Prefect UI, not as ``int | None`` toggles.

    ``X | None = None`` becomes a schema of ``X`` without a default: the form shows an empty field
    (left empty, it is not sent and params.yaml applies), the server still checks the value's type and
    bounds when a run is created, and nothing is ever ``null`` in the form. Each description gains
    params.yaml's current value while deployments are built (``showing_current_values``).
    """
    current = _CURRENT_VALUES.get() or {}
    for name, prop in schema.get("properties", {}).items():
        if current.get(name) is not None:
            value = current[name]
            shown = ", ".join(map(str, value)) if isinstance(value, list | tuple) else value
            prop["description"] = f"{prop.get('description', '')} (params.yaml: {shown})".strip()
        branches = prop.get("anyOf")
        if not branches or {"type": "null"} not in branches:
            continue
        rest = [b for b in branches if b != {"type": "null"}]
        if len(rest) != 1 or not ({"type", "enum"} & set(rest[0])):
            continue  # a real union or a reference: the toggle is the honest form
        del prop["anyOf"]
        prop.update(rest[0])
        if prop.get("default", "") is None:
            del prop["default"]


def _unset(value: Any) -> bool:
    return value is None


def override(*, description: str, **constraints: Any) -> Any:
    """An optional override: None (the default) keeps params.yaml's value and is left out of the run's parameters."""
    return Field(None, description=description, exclude_if=_unset, **constraints)


# The dotted setting each typed field overrides.
FIELD_SETTINGS = {
    "student": "base.student",
    "guide": "base.guide",
    "max_per_task": "data.max_per_task",
    "max_steps": "train.max_steps",
    "epochs": "train.num_train_epochs",
    "batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate",
    "tasks": "evaluate.tasks",
    "gate_mode": "gate.mode",
}


class PipelineParameters(BaseModel):
    """Overrides of params.yaml for one run; a field left empty keeps the value in params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="GIST pipeline run", json_schema_extra=plain_form)

    student: str | None = override(
        min_length=1, description="base.student: packaged short name (all-MiniLM-L6-v2), local folder or Hub id"
    )
    guide: str | None = override(min_length=1, description="base.guide: the frozen guide model")
    data_sources: list[str] | None = override(
        min_length=1, description="names of data.classification entries to train on (a subset of params.yaml's)"
    )
    max_per_task: int | None = override(ge=1, description="data.max_per_task: triplets kept per source")
    max_steps: int | None = override(ge=1, le=1_000_000, description="train.max_steps (instead of epochs)")
    epochs: float | None = override(
        gt=0, le=10_000, description="train.num_train_epochs: passes over the triplets (instead of max_steps)"
    )
    batch_size: int | None = override(ge=2, le=65_536, description="train.batch_size")
    learning_rate: float | None = override(gt=0, lt=1, description="train.learning_rate")
    tasks: list[str] | None = override(
        min_length=1, description="evaluate.tasks, e.g. STSBenchmark, Banking77Classification, EmotionClassification"
    )
    gate_mode: GateMode | None = override(description="gate.mode: enabled, dry_run or disabled")
    update_checkout: bool = Field(
        False,
        description="first git pull --ff-only and dvc pull: train on the latest committed data version "
        "(the scheduled retrain sets it)",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description='any other setting as dotted key -> value, e.g. {"train.warmup_ratio": 0.05}',
    )

    @model_validator(mode="after")
    def _one_training_length(self) -> PipelineParameters:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("max_steps and epochs: set one of them, not both (each sets the training length)")
        return self

    @model_validator(mode="after")
    def _no_duplicates(self) -> PipelineParameters:
        for name in ("data_sources", "tasks"):
            values = getattr(self, name) or []
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"{name}: duplicate entries {dupes}")
        for key in self.overrides:
            if "." not in key or not all(key.split(".")):
                raise ValueError(f"overrides: {key!r} is not a dotted setting key such as train.warmup_ratio")
        return self

    @classmethod
    def current_values(cls, settings: Settings) -> dict[str, Any]:
        """params.yaml's value of each typed field, for the form's descriptions."""
        dumped = settings.model_dump(mode="json")
        out: dict[str, Any] = {}
        for field_name, dotted in FIELD_SETTINGS.items():
            node: Any = dumped
            for key in dotted.split("."):
                node = node[key]
            out[field_name] = node
        out["data_sources"] = [source["name"] for source in dumped["data"]["classification"]]
        return out

    def to_overrides(self, settings: Settings) -> dict[str, Any]:
        """The dotted-key overrides these parameters stand for, given the settings from params.yaml."""
        out: dict[str, Any] = {}
        simple = {k: v for k, v in FIELD_SETTINGS.items() if k != "tasks"}
        for field_name, dotted in simple.items():
            value = getattr(self, field_name)
            if value is not None:
                out[dotted] = value
        # One training length applies: choosing one here clears the other one params.yaml may set.
        if self.epochs is not None and settings.train.max_steps is not None:
            out["train.max_steps"] = None
        if self.max_steps is not None and settings.train.num_train_epochs is not None:
            out["train.num_train_epochs"] = None
        if self.data_sources is not None:
            known = {s.name: s for s in settings.data.classification}
            unknown = [n for n in self.data_sources if n not in known]
            if unknown:
                raise ConfigError(
                    f"data_sources: unknown {unknown}; params.yaml data.classification has: {', '.join(known)}"
                )
            out["data.classification"] = [known[n].model_dump(mode="json") for n in self.data_sources]
        if self.tasks is not None:
            out["evaluate.tasks"] = list(self.tasks)
            # The gate can only require tasks that are scored: narrowing the task set narrows it too.
            out["gate.required_tasks"] = [t for t in settings.gate.required_tasks if t in self.tasks]
        out.update(self.overrides)
        return out


def apply_parameters(
    settings: Settings, params: PipelineParameters | None, overrides: dict[str, Any] | None = None
) -> tuple[Settings, dict[str, Any]]:
    """Settings for one run and the dotted overrides that produced them (typed parameters, then ``overrides``)."""
    dotted = params.to_overrides(settings) if params is not None else {}
    dotted.update(overrides or {})
    return (with_overrides(settings, dotted) if dotted else settings), dotted
