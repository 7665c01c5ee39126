"""Settings: pydantic models for each section of params.yaml, loading and validation.

params.yaml is the single source of settings. Each stage reads its own section plus ``base``;
DVC tracks the dotted keys a stage reads, so changing one value reruns only what depends on it.
Every model forbids unknown keys so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gist_core.catalogue import HUB_PREFIX, LOCAL_TASKS
from gist_core.errors import ConfigError
from gist_core.hashing import json_digest
from gist_core.readers import TableFormat

PARAMS_FILE = "params.yaml"
# The sections whose values change the trained model: their hash is the model's params lineage.
MODEL_SECTIONS = ("base", "data", "train")
# What the promotion gate does with its decision (params.yaml gate.mode, the UI's gate_mode).
GateMode = Literal["enabled", "dry_run", "disabled"]
SQLITE_PREFIX = "sqlite:///"


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
    format: TableFormat = "csv"
    text_column: str = "text"
    label_column: str = "label"
    separator: str = Field(";", min_length=1, description="for format=lastsep: split each line on its last one")


# MTEB's English classification tasks with a train split: what GISTEmbed mined triplets from.
MTEB_CLASSIFICATION_DATASETS = (
    "AmazonCounterfactualClassification",
    "AmazonPolarityClassification",
    "AmazonReviewsClassification",
    "Banking77Classification",
    "EmotionClassification",
    "ImdbClassification",
    "MassiveIntentClassification",
    "MassiveScenarioClassification",
    "MTOPDomainClassification",
    "MTOPIntentClassification",
    "ToxicConversationsClassification",
    "TweetSentimentExtractionClassification",
)


class MiningSettings(_Section):
    """How classification train splits become triplets (gist_core.mining)."""

    positive_strategy: Literal["guide_topk", "random"] = Field(
        "guide_topk", description="guide_topk: sampled from the guide's top-k same-label texts; random: uniform"
    )
    top_k: int = Field(100, ge=1)
    temperature: float = Field(0.05, gt=0, description="softmax temperature over the top-k similarities")
    max_texts_per_task: int | None = Field(
        2000, ge=2, description="texts per task sampled (seeded) before embedding; None: all"
    )
    exclude: list[str] = Field(
        default_factory=lambda: ["AmazonPolarityClassification"],
        description="datasets never mined (MTEB names, 'Classification' suffix optional)",
    )
    max_seq_length: int = Field(128, ge=8, le=8192, description="the guide's token limit while mining")
    batch_size: int = Field(64, ge=1)
    cache_dir: str | None = Field(".cache/guide-embeddings", description="guide-embedding cache; None: no cache")


class MediSettings(_Section):
    """MEDI (the INSTRUCTOR training set) from a local file or a Hugging Face Hub dataset id."""

    path: str = Field(min_length=1, description="a .json/.jsonl(.gz)/.parquet file, or a Hub dataset id")
    format: Literal["auto", "json", "jsonl", "parquet"] = "auto"
    keep_instructions: bool = Field(False, description="GIST trains without MEDI's instructions")
    split: str = "train"
    revision: str | None = None


class ContaminationSettings(_Section):
    tasks: list[str] | None = Field(None, description="local evaluation tasks to check; None: evaluate.tasks")
    remove: bool = True


class AuditSettings(_Section):
    guide_verdicts: bool = Field(True, description="score kept triplets with the guide; flag sim(q,n) >= sim(q,p)")
    examples: int = Field(5, ge=0, description="flagged rows shown in the Markdown report")


class DataSettings(_Section):
    classification: list[ClassificationSource] = Field(description="labelled train splits to mine ([] for none)")
    mining: MiningSettings = MiningSettings()
    medi: MediSettings | None = None
    contamination: ContaminationSettings = ContaminationSettings()
    audit: AuditSettings = AuditSettings()
    max_per_task: int | None = Field(2000, ge=1, description="cap on triplets per task (None: all)")
    max_text_chars: int = Field(20_000, ge=1, description="longer texts are quarantined")
    max_bad_fraction: float = Field(0.5, ge=0, le=1, description="fail when more of a file's rows are malformed")
    embeddings: str = "data/prepared/guide_embeddings"
    mined: str = "data/prepared/mined"
    output: str = "data/prepared/triplets.parquet"
    report: str = "reports/data.json"
    report_markdown: str = "reports/data.md"
    quarantine: str = "reports/quarantine.csv"

    @field_validator("classification")
    @classmethod
    def _unique_names(cls, sources: list[ClassificationSource]) -> list[ClassificationSource]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate classification source names: {dupes}")
        return sources

    @model_validator(mode="after")
    def _sources_and_exclusions(self) -> DataSettings:
        if not self.classification and self.medi is None:
            raise ValueError("no training data: give data.classification sources, data.medi, or both")
        known = {*MTEB_CLASSIFICATION_DATASETS, *(s.name for s in self.classification)}
        unknown = [e for e in self.mining.exclude if e not in known and f"{e}Classification" not in known]
        if unknown:
            raise ValueError(
                f"mining.exclude names unknown datasets {unknown}: not a data.classification source "
                f"and not an MTEB classification dataset ({', '.join(MTEB_CLASSIFICATION_DATASETS)})"
            )
        return self

    def is_excluded(self, name: str) -> bool:
        return any(name in (e, f"{e}Classification") for e in self.mining.exclude)


class TrainSettings(_Section):
    output_dir: str = "outputs/candidate"
    loss: Literal["gist", "mnrl"] = "gist"
    temperature: float = Field(0.01, gt=0)
    batch_size: int = Field(32, ge=2)
    # Training length: exactly one of the two is set (the other null).
    max_steps: int | None = Field(30, ge=1, description="optimizer steps to train for")
    num_train_epochs: float | None = Field(None, gt=0, description="passes over the triplets (may be fractional)")
    learning_rate: float = Field(2e-5, gt=0, lt=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_seq_length: int = Field(64, ge=8, le=8192)
    batch_sampler: Literal["no_duplicates", "no_duplicates_hashed", "batch_sampler"] = "no_duplicates"
    task_homogeneous_batches: bool = True
    logging_steps: int = Field(5, ge=1)
    # GIST false-negative masking (sentence-transformers' GISTEmbedLoss options).
    margin_strategy: Literal["absolute", "relative"] = "absolute"
    margin: float = Field(0.0, ge=0, le=1, description="mask candidates the guide scores above positive - margin")
    contrast_anchors: bool = True
    contrast_positives: bool = True
    guide_cache: bool = Field(True, description="look the frozen guide's embeddings up instead of running it")
    guide_cache_dir: str = "data/prepared/guide_cache"
    guide_cache_dtype: Literal["float32", "float16"] = Field(
        "float32", description="storage of the cached guide embeddings; float16 halves it (parity error in docs)"
    )
    mini_batch_size: int | None = Field(None, ge=1, description="GradCache mini-batch (None: no GradCache)")
    save_steps: int | None = Field(10, ge=1, description="checkpoint every N steps for resuming (None: never)")
    checkpoints_dir: str = "outputs/checkpoints"
    cached_models: int = Field(
        2,
        ge=0,
        description="finished models kept in checkpoints_dir/<training key>/model and reused by a run with the "
        "same key instead of training again (most recently used first; 0: never reuse)",
    )

    @model_validator(mode="after")
    def _one_training_length(self) -> TrainSettings:
        if (self.max_steps is None) == (self.num_train_epochs is None):
            given = "both are set" if self.max_steps is not None else "neither is set"
            raise ValueError(
                f"set exactly one of train.max_steps and train.num_train_epochs, the other to null ({given})"
            )
        return self

    @property
    def length_description(self) -> str:
        """The training length for people: ``30 steps`` or ``2.5 epochs``."""
        if self.max_steps is not None:
            return f"{self.max_steps} steps"
        return f"{self.num_train_epochs:g} epochs"

    @model_validator(mode="after")
    def _mini_batch_fits(self) -> TrainSettings:
        if self.mini_batch_size is not None and self.mini_batch_size > self.batch_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) is larger than batch_size ({self.batch_size}); "
                "use null for no GradCache"
            )
        return self


class _CustomTask(_Section):
    """A user's evaluation task read from files (see README, *Evaluation*); named in evaluate.tasks."""

    # The name becomes a result file name (<Task>.json) and MLflow metric keys.
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    description: str = ""
    languages: list[str] = Field(default_factory=lambda: ["eng-Latn"], min_length=1, description="ISO 639-3 + script")
    license: str = "not specified"
    citation: str = ""
    main_score: str | None = Field(None, min_length=1, description="None: the type's usual main score")


class CustomSTSTask(_CustomTask):
    """Sentence pairs with a gold similarity score; scored by Spearman correlation of cosine similarities."""

    type: Literal["STS"]
    test: str = Field(min_length=1)
    format: Literal["jsonl", "csv", "tsv"] = "jsonl"
    sentence1_column: str = "sentence1"
    sentence2_column: str = "sentence2"
    score_column: str = "score"
    min_score: float = 0.0
    max_score: float = 5.0

    @model_validator(mode="after")
    def _score_range(self) -> CustomSTSTask:
        if self.max_score <= self.min_score:
            raise ValueError(f"max_score ({self.max_score}) must be greater than min_score ({self.min_score})")
        return self


class CustomClassificationTask(_CustomTask):
    """Labelled texts; a logistic regression on a few embeddings per label from train, scored on test."""

    type: Literal["Classification"]
    train: str = Field(min_length=1)
    test: str = Field(min_length=1)
    format: TableFormat = "csv"
    text_column: str = "text"
    label_column: str = "label"
    separator: str = Field(";", min_length=1, description="for format=lastsep: split each line on its last one")
    samples_per_label: int = Field(8, ge=1, description="train examples per label in each experiment (mteb's)")
    n_experiments: int = Field(10, ge=1)


class CustomRetrievalTask(_CustomTask):
    """BEIR-format retrieval: corpus and queries as JSON lines, qrels as a TSV with a header."""

    type: Literal["Retrieval"]
    corpus: str = Field(min_length=1)
    queries: str = Field(min_length=1)
    qrels: str = Field(min_length=1)


CustomTask = Annotated[CustomSTSTask | CustomClassificationTask | CustomRetrievalTask, Field(discriminator="type")]


class EvaluateSettings(_Section):
    # Each entry: a local task (gist_core.catalogue.LOCAL_TASKS), the name of one of custom_tasks, or
    # "mteb:<task or benchmark>" for mteb's official tasks from the Hugging Face Hub.
    tasks: list[str] = Field(default_factory=lambda: ["STSBenchmark", "Banking77Classification"], min_length=1)
    custom_tasks: list[CustomTask] = Field(default_factory=list)
    data_dir: str = "data/raw"
    batch_size: int = Field(64, ge=1)
    max_seq_length: int | None = Field(None, ge=8, le=8192, description="None: each model's own")
    progress_bar: bool = True
    # bfloat16: forward passes under bf16 autocast; ~2.2x faster on CPUs with AMX (BENCHMARKS.md),
    # scores within ~0.2 point of float32 on the pack; cached apart from float32 results.
    precision: Literal["float32", "bfloat16"] = "float32"
    cache_dir: str = ".cache/mteb"
    output: str = "reports/eval.json"

    @model_validator(mode="after")
    def _task_names_are_known(self) -> EvaluateSettings:
        custom = [t.name for t in self.custom_tasks]
        dupes = sorted({n for n in custom if custom.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate custom_tasks names: {dupes}")
        clash = sorted(set(custom) & set(LOCAL_TASKS))
        if clash:
            raise ValueError(f"custom_tasks names {clash} are local tasks already; choose other names")
        dupes = sorted({n for n in self.tasks if self.tasks.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate tasks: {dupes}")
        unknown = [t for t in self.tasks if not t.startswith(HUB_PREFIX) and t not in LOCAL_TASKS and t not in custom]
        if unknown:
            known = ", ".join([*LOCAL_TASKS, *custom])
            raise ValueError(
                f"unknown tasks {unknown}: not a local task, not in custom_tasks ({known}), "
                f"and not '{HUB_PREFIX}<official task or benchmark>'"
            )
        return self


class RegistrySettings(_Section):
    tracking_uri: str = Field("sqlite:///mlflow.db", min_length=1)
    artifact_location: str = "mlartifacts"
    experiment: str = Field("gist", min_length=1)
    model_name: str = Field("gist-embedding", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    champion_dir: str = Field("outputs/champion", description="where the current champion is downloaded to")
    retry_attempts: int = Field(4, ge=1, description="attempts per registry call while MLflow is unreachable")
    retry_backoff_seconds: float = Field(1.0, ge=0, description="first retry delay; doubles per attempt")
    lock_timeout_seconds: float = Field(120.0, gt=0, description="wait for another promotion of the same model")
    lock_lease_seconds: float = Field(
        300.0, ge=10, description="a promotion lock on a tracking server older than this (its holder died) is broken"
    )


class GateSettings(_Section):
    mode: GateMode = "enabled"
    baseline: Literal["champion", "base"] = Field(
        "champion", description="champion: the current champion when there is one, else the base student"
    )
    min_mean_delta: float = Field(
        0.001,
        description="the mean of per-task deltas must be at least this; positive, so a tie (no change) blocks",
    )
    min_category_delta: dict[str, float] = Field(
        default_factory=dict, description="per MTEB task type (STS, Classification, ...): minimum mean delta"
    )
    max_task_regression: float = Field(0.01, ge=0, description="no task may drop by more than this")
    required_tasks: list[str] = Field(default_factory=lambda: ["STSBenchmark", "Banking77Classification"])


class OrchestrationSettings(_Section):
    """How the Prefect flow runs the stages (launcher, fan-out, caching, schedule); not what they compute."""

    train_launcher: Literal["none", "torchrun"] = Field(
        "none", description="torchrun: the fine-tune task runs `torchrun --nproc_per_node N -m gist_core train`"
    )
    nproc_per_node: int | Literal["gpu", "auto"] = Field(
        "gpu", description="torchrun processes per node: a number, gpu (one per GPU) or auto"
    )
    parallel_evaluation: bool = Field(False, description="one Prefect task per entry of evaluate.tasks")
    cache_data_stage: bool = Field(
        True, description="skip dvc repro + push when dvc.lock, the data params and the stage's inputs are unchanged"
    )
    schedule_cron: str = Field("0 3 * * 1", description="cron of the scheduled-retrain deployment")
    schedule_timezone: str = Field("UTC", min_length=1)

    @field_validator("nproc_per_node")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"nproc_per_node must be at least 1, got {value}")
        return value

    @field_validator("schedule_cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        # Prefect parses the expression itself when the deployment is created; catch the common slips here.
        fields = value.split()
        if len(fields) != 5 or not all(re.fullmatch(r"[0-9A-Za-z*/,\-?]+", f) for f in fields):
            raise ValueError(f"schedule_cron {value!r}: expected 5 cron fields, e.g. '0 3 * * 1'")
        return value

    @field_validator("schedule_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"schedule_timezone {value!r}: not an IANA time zone such as UTC") from None
        return value


# Training settings an ablation arm may not change: they are where and how long it runs, set by the ablation.
_ARM_FIXED_TRAIN_KEYS = frozenset(
    {
        "output_dir",
        "checkpoints_dir",
        "save_steps",
        "guide_cache_dir",
        "max_steps",
        "num_train_epochs",
        "batch_size",
        "logging_steps",
    }
)


class AblationArm(_Section):
    """One arm: the untrained student (``base: true``), or training with these overrides of the train section."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,39}$", description="lower-case, e.g. gist-live")
    base: bool = Field(False, description="the student as it is, no training")
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of train.*, e.g. {loss: mnrl}")
    mining: dict[str, Any] = Field(
        default_factory=dict, description="overrides of data.mining.*: the arm trains on its own re-mined data"
    )

    @model_validator(mode="after")
    def _valid_overrides(self) -> AblationArm:
        if self.base and (self.train or self.mining):
            raise ValueError(f"arm {self.name!r}: a base arm trains nothing; drop its train/mining overrides")
        fixed = sorted(set(self.train) & _ARM_FIXED_TRAIN_KEYS)
        if fixed:
            raise ValueError(f"arm {self.name!r}: {fixed} are set by the ablation section, not per arm")
        try:  # the values must be valid train / mining settings themselves
            TrainSettings.model_validate({**TrainSettings().model_dump(), **self.train})
            MiningSettings.model_validate({**MiningSettings().model_dump(), **self.mining})
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors())
            raise ValueError(f"arm {self.name!r}: {problems}") from None
        return self


def _default_arms() -> list[AblationArm]:
    return [
        AblationArm(name="base", base=True),
        AblationArm(name="mnrl", train={"loss": "mnrl"}),
        AblationArm(name="gist", train={"loss": "gist", "guide_cache": True}),
    ]


class AblationSettings(_Section):
    """``gist ablation``: the same student, data version, steps, batch and seeds under several arms (README)."""

    arms: list[AblationArm] = Field(default_factory=_default_arms, min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3], min_length=1)
    noise_levels: list[float] = Field(default_factory=lambda: [0.0, 0.2, 0.4], min_length=1)
    positive_noise_share: float = Field(
        0.5, ge=0, le=1, description="of the corrupted triplets, the share whose positive is replaced (rest: negative)"
    )
    max_triplets_per_task: int | None = Field(None, ge=2, description="a seeded subset of each task's triplets")
    max_steps: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=2)
    tasks: list[str] | None = Field(None, description="evaluation tasks (None: evaluate.tasks)")
    compare: list[tuple[str, str]] = Field(
        default_factory=lambda: [("gist", "mnrl"), ("gist", "base"), ("mnrl", "base")],
        description="(arm, against) pairs the report gives a verdict for",
    )
    output_dir: str = "outputs/ablation"
    docs: str | None = Field("docs/ablation.md", description="the table is also written here (chart beside it)")
    experiment: str = Field("gist-ablation", min_length=1)
    keep_models: bool = Field(False, description="keep every trained arm's model folder (about 90 MB each)")

    @model_validator(mode="after")
    def _consistent(self) -> AblationSettings:
        names = [a.name for a in self.arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate arm names: {dupes}")
        if len(set(self.seeds)) != len(self.seeds) or any(seed < 0 for seed in self.seeds):
            raise ValueError(f"seeds must be distinct non-negative integers, got {self.seeds}")
        if len(set(self.noise_levels)) != len(self.noise_levels) or any(not 0 <= n < 1 for n in self.noise_levels):
            raise ValueError(f"noise_levels must be distinct fractions in [0, 1), got {self.noise_levels}")
        unknown = sorted({n for pair in self.compare for n in pair if n not in names})
        if unknown:
            raise ValueError(f"compare names arms that are not in arms: {unknown}")
        return self


class Settings(_Section):
    """All of params.yaml, with paths resolved against the project root."""

    base: BaseSettings = BaseSettings()
    data: DataSettings
    train: TrainSettings = TrainSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    registry: RegistrySettings = RegistrySettings()
    gate: GateSettings = GateSettings()
    orchestration: OrchestrationSettings = OrchestrationSettings()
    ablation: AblationSettings = AblationSettings()
    root: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _required_tasks_are_evaluated(self) -> Settings:
        named = {t.removeprefix(HUB_PREFIX) for t in self.evaluate.tasks}
        missing = [t for t in self.gate.required_tasks if t not in named]
        # A "mteb:<benchmark>" entry expands to task names only known to mteb: the gate checks those.
        if missing and not any(t.startswith(HUB_PREFIX) for t in self.evaluate.tasks):
            raise ValueError(f"gate.required_tasks names tasks not in evaluate.tasks: {missing}")
        return self

    def path(self, relative: str) -> Path:
        """Resolve a path from params.yaml against the project root."""
        p = Path(relative)
        return p if p.is_absolute() else self.root / p

    @property
    def tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI wins over params.yaml; a relative sqlite path is made absolute."""
        return normalize_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or self.registry.tracking_uri, self.root)

    def stage_params(self, *sections: str) -> dict[str, Any]:
        """Flattened ``section.key`` params of the named sections, for logging."""
        dumped = self.model_dump(mode="json")
        out: dict[str, Any] = {}
        for section in sections:
            _flatten(dumped[section], section, out)
        return out

    def params_hash(self, *sections: str) -> str:
        """sha256 of the canonical JSON of the named sections (default: those that shape the model)."""
        dumped = self.model_dump(mode="json")
        chosen = {s: dumped[s] for s in sections or MODEL_SECTIONS}
        return json_digest(chosen)


def normalize_tracking_uri(uri: str, root: Path) -> str:
    """A tracking URI with a relative SQLite path made absolute against ``root`` (other URIs unchanged)."""
    if uri.startswith(SQLITE_PREFIX) and not uri.startswith(SQLITE_PREFIX + "/"):
        return SQLITE_PREFIX + str((root / uri[len(SQLITE_PREFIX) :]).resolve())
    return uri


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
