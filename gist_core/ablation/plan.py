"""The ablation's plan: which runs, where each writes, and the key under which a finished run is reused.

Default arms (params.yaml ``ablation``): the untrained student (``base``), MultipleNegativesRankingLoss
without a guide (``mnrl``) and the guided GISTEmbed loss (``gist``). Every trained arm runs once per
seed and noise level, on the same data version; at a given seed and noise level every arm sees the
same (corrupted) triplets, so arms are compared pairwise on identical data.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from gist_core.config import AblationArm, Settings
from gist_core.evaluation.tasks import build_tasks
from gist_core.hashing import json_digest
from gist_core.models import ensure_available, model_fingerprint, resolve_model, runtime_libraries
from gist_core.training.guide_cache import read_manifest
from gist_core.training.trainer import NOT_IN_RUN_KEY, training_code_hash

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
CORRUPTED_SUFFIX = ".corrupted.csv"
DEFAULT_VARIANT = "default"
OVERALL = "mean"  # the mean over tasks, per seed, then across seeds
RESULT_FORMAT = 1
# `gist ablation --quick`: a few minutes on 2 cores, for tests and a first look (not for conclusions).
QUICK_OVERRIDES: dict[str, Any] = {
    "ablation.seeds": [1, 2],
    "ablation.noise_levels": [0.0, 0.4],
    "ablation.max_steps": 2,
    "ablation.batch_size": 8,
    "ablation.max_triplets_per_task": 48,
    "ablation.tasks": ["STSBenchmark"],
    "ablation.output_dir": "outputs/ablation-quick",
    "ablation.docs": None,
}


@dataclass(frozen=True)
class RunSpec:
    """One training (or, for a base arm, scoring) run of the ablation."""

    arm: str
    noise: float
    seed: int

    @property
    def label(self) -> str:
        return f"{self.arm}/noise-{self.noise:.2f}/seed-{self.seed}"


@dataclass
class RunRecord:
    """What one run produced: its scores, training summary and guide masking rates."""

    arm: str
    noise: float
    seed: int
    scores: dict[str, float]  # task -> main score (0-1)
    categories: dict[str, str]  # task -> MTEB task type
    key: str = ""
    steps: int = 0
    train_loss: float | None = None
    seconds: float = 0.0
    masked: dict[str, float] = field(default_factory=dict)  # guide_masked_* means over the logged intervals
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    data_file: str | None = None
    run_id: str | None = None
    reused: bool = field(default=False, compare=False)  # read from an earlier invocation's result.json

    def to_dict(self) -> dict[str, Any]:
        return {"format": RESULT_FORMAT, **{k: v for k, v in asdict(self).items() if k != "reused"}}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunRecord:
        raw = {k: v for k, v in raw.items() if k not in ("format", "reused")}
        raw["loss_curve"] = [tuple(point) for point in raw.get("loss_curve") or []]
        return cls(**raw)


def arms_by_name(settings: Settings) -> dict[str, AblationArm]:
    return {arm.name: arm for arm in settings.ablation.arms}


def plan(settings: Settings) -> list[RunSpec]:
    """Every run, in the order they execute: base arms once, then each noise level, seed and arm."""
    cfg = settings.ablation
    specs = [RunSpec(a.name, 0.0, settings.base.seed) for a in cfg.arms if a.base]
    trained = [a for a in cfg.arms if not a.base]
    for noise in cfg.noise_levels:
        for seed in cfg.seeds:
            specs += [RunSpec(a.name, noise, seed) for a in trained]
    return specs


def variant_of(arm: AblationArm) -> str:
    """Arms with mining overrides train on their own re-mined data; the others share the default data."""
    return arm.name if arm.mining else DEFAULT_VARIANT


def output_dir(settings: Settings) -> Path:
    return settings.path(settings.ablation.output_dir)


def run_dir(settings: Settings, spec: RunSpec) -> Path:
    return output_dir(settings) / "runs" / spec.arm / f"noise-{spec.noise:.2f}" / f"seed-{spec.seed}"


def variant_dir(settings: Settings, variant: str) -> Path:
    return output_dir(settings) / "data" / variant


def clean_file(settings: Settings, variant: str) -> Path:
    return variant_dir(settings, variant) / "clean.parquet"


def noisy_file(settings: Settings, variant: str, noise: float, seed: int) -> Path:
    if noise == 0:
        return clean_file(settings, variant)
    return variant_dir(settings, variant) / f"noise-{noise:.2f}-seed-{seed}.parquet"


def guide_cache_dir(settings: Settings, variant: str, data_md5: str | None = None) -> Path:
    """The variant's guide-embedding cache: the DVC stage's when built for the same data, else the ablation's own."""
    staged = settings.path(settings.train.guide_cache_dir)
    identity = (read_manifest(staged) or {}).get("identity") or {}
    if (
        variant == DEFAULT_VARIANT
        and data_md5 is not None
        and identity.get("data_md5") == data_md5
        and identity.get("max_seq_length") == settings.train.max_seq_length
        and identity.get("guide") == settings.base.guide
    ):
        return staged
    return output_dir(settings) / "guide_cache" / variant


def eval_tasks(settings: Settings) -> list[str]:
    return list(settings.ablation.tasks or settings.evaluate.tasks)


def check(settings: Settings) -> None:
    """Cheap checks before any work: the evaluation tasks exist and a trained arm has labelled data to corrupt."""
    cfg = settings.evaluate
    build_tasks(eval_tasks(settings), settings.path(cfg.data_dir), custom_tasks=cfg.custom_tasks, root=settings.root)
    if not any(not arm.base for arm in settings.ablation.arms) and any(n > 0 for n in settings.ablation.noise_levels):
        log.warning("ablation: only base arms; the noise levels change nothing")


def content_identity(settings: Settings, trained: bool = True) -> dict[str, Any]:
    """What the ablation's results depend on besides settings: content, never names.

    The evaluation tasks' data revisions, the mteb version, the student's content fingerprint and,
    for a trained arm, the guide's and the training code's hash (``training_code_hash``: the
    training package and the sentence-transformers / transformers / torch versions, which also
    decide the scores).
    """
    cfg = settings.evaluate
    tasks = build_tasks(
        eval_tasks(settings), settings.path(cfg.data_dir), custom_tasks=cfg.custom_tasks, root=settings.root
    )
    models_dir = settings.path(settings.base.models_dir)
    identity: dict[str, Any] = {
        "task_revisions": {t.metadata.name: t.metadata.revision for t in tasks},
        "mteb": package_version("mteb"),
        "libraries": runtime_libraries(),
        "student": model_fingerprint(ensure_available(resolve_model(settings.base.student, models_dir, settings.root))),
    }
    if trained:
        guide = ensure_available(resolve_model(settings.base.guide, models_dir, settings.root))
        identity |= {"guide": model_fingerprint(guide), "training_code": training_code_hash()}
    return identity


def run_key(settings: Settings, spec: RunSpec, data_md5: str | None, identity: dict[str, Any] | None = None) -> str:
    """A hash of everything that decides a run's result: a rerun with the same key reuses its result.

    ``identity``: ``content_identity`` (computed here when not given), so changed task data, another
    mteb or library version, or other model weights under the same name never reuse a stale result.
    """
    arm = arms_by_name(settings)[spec.arm]
    payload = {
        "arm": arm.model_dump(mode="json"),
        "spec": asdict(spec),
        "data_md5": data_md5,
        "content": identity if identity is not None else content_identity(settings, trained=not arm.base),
        "train": settings.train.model_dump(mode="json", exclude=set(NOT_IN_RUN_KEY)),
        "ablation": settings.ablation.model_dump(
            mode="json", include={"max_steps", "batch_size", "max_triplets_per_task", "positive_noise_share"}
        ),
        "evaluate": settings.evaluate.model_dump(mode="json", include={"max_seq_length", "precision"}),
        "tasks": eval_tasks(settings),
        "format": RESULT_FORMAT,
    }
    return json_digest(payload)[:16]
