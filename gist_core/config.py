"""Settings: pydantic models for each section of params.yaml, loading and validation.

params.yaml is the single source of settings. Each stage reads its own section plus ``base``;
DVC tracks the dotted keys a stage reads, so changing one value reruns only what depends on it.
Every model forbids unknown keys so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gist_core.errors import ConfigError

PARAMS_FILE = "params.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseSettings(_Section):
    seed: int = Field(42, ge=0)
    models_dir: str = "models"
    student: str = Field("all-MiniLM-L6-v2", min_length=1)
    guide: str = Field("all-mpnet-base-v2", min_length=1)


class ClassificationSource(_Section):
    """A classification data set whose train split is turned into triplets."""

    name: str = Field(min_length=1, description="task name recorded in the task_name column")
    path: str = Field(min_length=1)
    format: Literal["csv", "tsv", "jsonl", "parquet", "lastsep"] = "csv"
    text_column: str = "text"
    label_column: str = "label"
    separator: str = Field(";", min_length=1, description="for format=lastsep: split each line on its last one")


class DataSettings(_Section):
    classification: list[ClassificationSource] = Field(min_length=1)
    max_per_task: int | None = Field(None, ge=1, description="cap on triplets per task (None: all)")
    output: str = "data/prepared/triplets.parquet"
    report: str = "reports/data.json"
    quarantine: str = "reports/quarantine.csv"

    @field_validator("classification")
    @classmethod
    def _unique_names(cls, sources: list[ClassificationSource]) -> list[ClassificationSource]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate classification source names: {dupes}")
        return sources


class TrainSettings(_Section):
    output_dir: str = "outputs/candidate"
    loss: Literal["gist", "mnrl"] = "gist"
    temperature: float = Field(0.01, gt=0)
    batch_size: int = Field(32, ge=2)
    max_steps: int = Field(40, ge=1)
    learning_rate: float = Field(2e-5, gt=0, lt=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_seq_length: int = Field(64, ge=8, le=8192)
    batch_sampler: Literal["no_duplicates", "batch_sampler"] = "no_duplicates"
    task_homogeneous_batches: bool = True
    logging_steps: int = Field(5, ge=1)


class EvaluateSettings(_Section):
    tasks: list[str] = Field(default_factory=lambda: ["STSBenchmark", "Banking77Classification"], min_length=1)
    data_dir: str = "data/raw"
    batch_size: int = Field(64, ge=1)
    max_seq_length: int | None = Field(None, ge=8, le=8192, description="None: each model's own")
    cache_dir: str = ".cache/mteb"
    output: str = "reports/eval.json"


class RegistrySettings(_Section):
    tracking_uri: str = Field("sqlite:///mlflow.db", min_length=1)
    artifact_location: str = "mlartifacts"
    experiment: str = Field("gist", min_length=1)
    model_name: str = Field("gist-embedding", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")


class GateSettings(_Section):
    mode: Literal["enabled", "dry_run", "disabled"] = "enabled"
    min_mean_delta: float = Field(0.0, description="the mean of per-task deltas must be at least this")
    max_task_regression: float = Field(0.01, ge=0, description="no task may drop by more than this")
    required_tasks: list[str] = Field(default_factory=list)


class Settings(_Section):
    """All of params.yaml, with paths resolved against the project root."""

    base: BaseSettings = BaseSettings()
    data: DataSettings
    train: TrainSettings = TrainSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    registry: RegistrySettings = RegistrySettings()
    gate: GateSettings = GateSettings()
    root: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _required_tasks_are_evaluated(self) -> Settings:
        missing = [t for t in self.gate.required_tasks if t not in self.evaluate.tasks]
        if missing:
            raise ValueError(f"gate.required_tasks names tasks not in evaluate.tasks: {missing}")
        return self

    def path(self, relative: str) -> Path:
        """Resolve a path from params.yaml against the project root."""
        p = Path(relative)
        return p if p.is_absolute() else self.root / p

    @property
    def tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI wins over params.yaml; a relative sqlite path is made absolute."""
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.registry.tracking_uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            uri = prefix + str((self.root / uri[len(prefix) :]).resolve())
        return uri

    def stage_params(self, *sections: str) -> dict[str, Any]:
        """Flattened ``section.key`` params of the named sections, for logging."""
        dumped = self.model_dump(mode="json")
        out: dict[str, Any] = {}
        for section in sections:
            _flatten(dumped[section], section, out)
        return out


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(inner, f"{prefix}.{key}", out)
    else:
        out[prefix] = value


def _format_validation_error(source: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<top level>"
        parts.append(f"{loc}: {e['msg']}")
    return f"{source}: invalid settings: " + "; ".join(parts)


def settings_from_dict(raw: dict[str, Any], root: Path, source: str = PARAMS_FILE) -> Settings:
    """Validate a params mapping; raises ConfigError naming the file and every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Settings.model_validate({**raw, "root": root.resolve()})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None


def load_settings(root: Path | str = ".", params_file: str | Path = PARAMS_FILE) -> Settings:
    """Read and validate ``params.yaml`` from the project root."""
    root = Path(root).resolve()
    path = Path(params_file)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --root)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return settings_from_dict(raw or {}, root, source=str(path))


def with_overrides(settings: Settings, overrides: dict[str, Any]) -> Settings:
    """A copy of settings with dotted-key overrides applied (``train.max_steps=10``), re-validated."""
    raw = settings.model_dump(mode="json")
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise ConfigError(f"override {dotted!r}: no settings section {key!r}")
            node = node[key]
        if leaf not in node:
            raise ConfigError(f"override {dotted!r}: unknown setting {leaf!r}")
        node[leaf] = value
    return settings_from_dict(raw, settings.root, source="overrides")
