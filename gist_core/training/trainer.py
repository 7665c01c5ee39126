"""Training entry: settings + prepared triplets in, a sentence-transformers checkpoint folder out.

Uses sentence-transformers' own trainer, GIST losses (``gist_core.loss``) and batch samplers. With
``task_homogeneous_batches`` the triplets are split into one dataset per ``task_name`` and the
trainer's multi-dataset sampler draws each batch from a single task, as the GISTEmbed code does;
``NO_DUPLICATES`` keeps any text from appearing twice in a batch.

A run is keyed by the content of what decides its result (``training_key``): the triplets' md5 (the
data version), the ``train`` settings except output paths and logging, the seed, the student's and
the guide's content fingerprints (not their names or paths), a hash of the code that trains (this
package's files and the sentence-transformers / transformers / torch versions) and the process
count. Its folder is ``train.checkpoints_dir/<key>``:

- every ``train.save_steps`` steps the run checkpoints there; started again with the same key, it
  resumes from the last complete checkpoint and ends where an uninterrupted run would;
- the finished model is kept there as ``model/`` (the checkpoints are removed), and a later call with
  the same key copies it to ``train.output_dir`` without training (``TrainResult.reused``). The
  ``train.cached_models`` most recently used finished models are kept; 0 turns the reuse off.

Under ``torchrun`` / ``accelerate launch`` it trains with DDP (gloo on CPU), gathers in-batch
candidates across processes, keeps the gathered batch to one task with no duplicates
(``gist_core.training.batching``), and only rank 0 saves the model, writes metrics and reports to ``on_log``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gist_core.config import Settings
from gist_core.folders import replaced_folder
from gist_core.hashing import file_md5, json_digest, labelled_files_digest
from gist_core.models import ModelRef, load_sentence_transformer, model_fingerprint, runtime_libraries
from gist_core.training.guide_cache import load_or_build_guide_cache, store_root
from gist_core.training.runtime import (
    cuda_bf16,
    is_main_process,
    pick_device,
    resolve_models,
    set_seed,
    world_size,
)
from gist_core.training.train_data import TRAIN_ARROW_DIR, build_train_dataset, text_labels

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from torch import nn

log = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]
TRAIN_METRICS_FILE = "train_metrics.json"
MODEL_CARD_FULL_STATS_TASKS = 16  # above this many tasks the model card's statistics read a sample of each
MODEL_CARD_SAMPLE_ROWS = 10
TRAINER_STATE_FILE = "trainer_state.json"  # written last into a checkpoint: its presence marks it complete
# Settings that change neither the trained weights nor the batches: a run may resume (or be reused) across them.
NOT_IN_RUN_KEY = frozenset(
    {"output_dir", "logging_steps", "save_steps", "checkpoints_dir", "guide_cache_dir", "cached_models"}
)
FINAL_MODEL = "model"  # the finished model inside a run's folder (``train.checkpoints_dir/<key>/model``)
TRAINING_CODE = Path(__file__).resolve().parent  # gist_core/training: the code that decides what is trained


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_loss: float
    seconds: float
    examples: int
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: str | None = None
    world_size: int = 1
    loss: str = ""
    guide: str = "none"  # model | cache | none
    gather_across_devices: bool = False
    skipped_tasks: dict[str, int] = field(default_factory=dict)  # task -> rows: cannot give one global batch
    key: str = ""  # ``training_key``: what decided this result
    reused: bool = False  # copied from the finished model of an earlier run with the same key

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["output_dir"] = str(self.output_dir)
        return out


def training_code_hash() -> str:
    """A hash of the code that trains: this package's modules and the runtime libraries' versions."""
    files = sorted(TRAINING_CODE.glob("*.py"))
    return labelled_files_digest(((f.name, f) for f in files), label_end=b"\0", extra=runtime_libraries().encode())


def run_key(settings: Settings, data_md5: str, processes: int, models: dict[str, str | None], code: str) -> str:
    """A hash of what decides a run's result: content, never paths or model names.

    ``models``: the student's and (for the guided loss) the guide's ``model_fingerprint``; ``code``:
    ``training_code_hash()``. The train settings count except ``NOT_IN_RUN_KEY``.
    """
    cfg = settings.train.model_dump(mode="json")
    payload = {
        "seed": settings.base.seed,
        "models": {"student": models.get("student"), "guide": models.get("guide") if cfg["loss"] == "gist" else None},
        "train": {k: v for k, v in cfg.items() if k not in NOT_IN_RUN_KEY},
        "data_md5": data_md5,
        "world_size": processes,
        "code": code,
    }
    return json_digest(payload)[:16]


def training_key(settings: Settings, data_md5: str, processes: int, student: ModelRef, guide: ModelRef) -> str:
    """``run_key`` with the models' fingerprints and the training code's hash computed here."""
    models = {
        "student": model_fingerprint(student),
        "guide": model_fingerprint(guide) if settings.train.loss == "gist" else None,
    }
    return run_key(settings, data_md5, processes, models, training_code_hash())


def last_checkpoint(run_dir: Path, remove_incomplete: bool = False) -> Path | None:
    """The newest complete ``checkpoint-N`` folder; newer incomplete ones (a kill mid-save) are skipped."""
    if not run_dir.is_dir():
        return None
    # deferred: transformers takes seconds to import
    from transformers.trainer_utils import sort_checkpoints

    for folder in reversed(sort_checkpoints(str(run_dir))):  # newest first
        path = Path(folder)
        if (path / TRAINER_STATE_FILE).is_file():
            return path
        log.warning("ignoring incomplete checkpoint %s", path)
        if remove_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return None


def training_arguments(settings: Settings, output_dir: Path, device: str, processes: int) -> Any:
    """The trainer's arguments: schedule, samplers, checkpointing, precision and DDP backend."""
    # deferred: sentence-transformers takes seconds to import (and the samplers import it)
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers, MultiDatasetBatchSamplers

    from gist_core.training.batching import GroupedProportionalFactory, SplitBatchSamplerFactory

    cfg = settings.train
    if processes > 1:
        # Every process takes one part of the same task's duplicate-free batch (gist_core.batching).
        batch_sampler: Any = SplitBatchSamplerFactory(cfg.batch_sampler, processes)
        multi_sampler: Any = GroupedProportionalFactory(processes)
    else:
        batch_sampler = BatchSamplers(cfg.batch_sampler)
        multi_sampler = MultiDatasetBatchSamplers.PROPORTIONAL
    # Exactly one of max_steps and num_train_epochs is set; the trainer reads max_steps=-1 as "by epochs".
    if cfg.max_steps is not None:
        length: dict[str, Any] = {"max_steps": cfg.max_steps}
    else:
        length = {"max_steps": -1, "num_train_epochs": cfg.num_train_epochs}
    return SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        **length,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of total steps (by steps or epochs)
        batch_sampler=batch_sampler,
        multi_dataset_batch_sampler=multi_sampler,
        seed=settings.base.seed,
        data_seed=settings.base.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=2,  # the newest may be incomplete if the run is killed while saving
        report_to="none",
        bf16=device.startswith("cuda") and cuda_bf16(),
        use_cpu=device == "cpu",
        ddp_backend="gloo" if processes > 1 and device == "cpu" else None,
        # Gathering across processes needs equal batch sizes on every process.
        dataloader_drop_last=processes > 1,
    )


def trainer_class() -> type:
    """``SentenceTransformerTrainer`` whose checkpoints are written by one process only.

    transformers 5 calls ``Trainer._save`` on every rank and leaves the check (``args.should_save``)
    to it; sentence-transformers' override of ``_save`` still assumes only the main process calls it.
    Under torchrun every rank would write the model, tokenizer, model card and training arguments
    into the same checkpoint folder at once (rank 0 alone writes the trainer state, the mark of a
    complete checkpoint, so another rank could still be writing after it).
    """
    # deferred: sentence-transformers takes seconds to import
    from sentence_transformers import SentenceTransformerTrainer

    class _Trainer(SentenceTransformerTrainer):
        def add_model_card_callback(self, default_args_dict: dict[str, Any]) -> None:
            datasets = self.train_dataset if isinstance(self.train_dataset, dict) else {}
            if len(datasets) > MODEL_CARD_FULL_STATS_TASKS:
                _sample_model_card_stats(self.model)  # before the callback computes the card's dataset statistics
            super().add_model_card_callback(default_args_dict)

        def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
            if not self.args.should_save:
                return
            super()._save(output_dir, state_dict=state_dict)

    return _Trainer


def _sample_model_card_stats(model: Any) -> None:
    """Keep the model card's per-dataset statistics to a few tasks and rows.

    sentence-transformers tokenizes up to 1,000 rows of every training dataset for the model card
    when the trainer starts, a few calls per column: with hundreds of tasks (MEDI has about 330) that
    is minutes of start-up at scale. With more than ``MODEL_CARD_FULL_STATS_TASKS`` tasks the first
    that many get statistics from their first ``MODEL_CARD_SAMPLE_ROWS`` rows, the rest their size,
    columns and loss only (the card's template leaves the statistics out).
    """
    card = model.model_card_data
    compute = card.compute_dataset_metrics
    done: list[dict[str, Any]] = []

    def sampled(dataset: Any, dataset_info: dict[str, Any], loss: Any, router_mapping: Any = None) -> dict[str, Any]:
        if dataset is None or not hasattr(dataset, "select") or not len(dataset):
            return compute(dataset, dataset_info, loss, router_mapping=router_mapping)
        if len(done) < MODEL_CARD_FULL_STATS_TASKS:
            head = dataset.select(range(min(len(dataset), MODEL_CARD_SAMPLE_ROWS)))
            out = compute(head, dataset_info, loss, router_mapping=router_mapping)
            done.append(out)
        else:
            columns = [c for c in dataset.column_names if c != "dataset_name"]
            out = {**dataset_info, "columns": [f"<code>{c}</code>" for c in columns], "loss": done[0]["loss"]}
        out["size"] = len(dataset)
        return out

    card.compute_dataset_metrics = sampled


class _TrainingMonitor:
    """Adds the guide-masked fraction and examples/s to each training log and reports it (rank 0)."""

    def __init__(self, loss: nn.Module, examples_per_step: int, on_log: LogFn | None) -> None:
        # deferred: the loss module imports torch and sentence-transformers
        from gist_core.training.loss import mask_stats

        self.stats = mask_stats(loss)
        self.examples_per_step = examples_per_step
        self.on_log = on_log
        self.extras: dict[int, dict[str, float]] = {}
        self._since = (0, time.perf_counter())

    def callback(self) -> Any:
        # deferred: transformers takes seconds to import
        from transformers import TrainerCallback

        monitor = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                monitor._since = (state.global_step, time.perf_counter())

            def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
                monitor.record(state, logs or {})

        return _Callback()

    def record(self, state: Any, logs: dict[str, Any]) -> None:
        numeric = {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
        if "loss" in numeric:  # a training-step log (not the end-of-training summary)
            step, since = self._since
            now = time.perf_counter()
            if state.global_step > step:
                numeric["examples_per_second"] = (state.global_step - step) * self.examples_per_step / (now - since)
            self._since = (state.global_step, now)
            if self.stats is not None:
                numeric.update(self.stats.pop_counts(reduce_across_processes=True))  # every rank calls it
            self.extras[int(state.global_step)] = {
                k: v for k, v in numeric.items() if k == "examples_per_second" or k.startswith("guide_masked")
            }
        if numeric and state.is_world_process_zero and self.on_log is not None:
            self.on_log(numeric, int(state.global_step))

    def history(self, log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
        """The trainer's log history (restored on resume) with this monitor's numbers merged in."""
        out = []
        for entry in log_history:
            numeric = {k: float(v) for k, v in entry.items() if isinstance(v, int | float)}
            step = int(numeric.get("step", 0))
            out.append({**numeric, **(self.extras.get(step, {}) if "loss" in numeric else {})})
        return out


def mean_train_loss(log_history: list[dict[str, Any]]) -> float:
    """The mean loss over all steps, from the logged per-interval means (complete across a resume)."""
    total, last_step = 0.0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            total += float(entry["loss"]) * (int(entry["step"]) - last_step)
            last_step = int(entry["step"])
    return total / last_step if last_step else float("nan")


@contextmanager
def _run_folder(settings: Settings, key: str) -> Iterator[Path]:
    """The persistent folder of this run (checkpoints, then the finished model), or a scratch folder
    when there is nothing to keep (no checkpoints and no reuse)."""
    if settings.train.save_steps or settings.train.cached_models:
        yield settings.path(settings.train.checkpoints_dir) / key
        return
    with tempfile.TemporaryDirectory(prefix="gist-train-") as scratch:
        yield Path(scratch)


def stored_model(settings: Settings, key: str) -> Path | None:
    """The finished model an earlier run with ``key`` kept, or None (none kept, or reuse is off)."""
    folder = settings.path(settings.train.checkpoints_dir) / key / FINAL_MODEL
    if settings.train.cached_models and (folder / TRAIN_METRICS_FILE).is_file():  # written last: complete
        return folder
    return None


def _reuse(settings: Settings, stored: Path, key: str) -> TrainResult:
    """Copy a kept model to ``train.output_dir`` and return its training summary, marked reused."""
    raw = json.loads((stored / TRAIN_METRICS_FILE).read_text())
    known = set(TrainResult.__dataclass_fields__)
    output_dir = settings.path(settings.train.output_dir)
    result = TrainResult(**{**{k: v for k, v in raw.items() if k in known}, "output_dir": output_dir})
    result.key, result.reused = key, True
    if is_main_process():
        _copy_atomically(stored, output_dir, result)
        os.utime(stored / TRAIN_METRICS_FILE)  # most recently used: kept longest
    log.info("reusing the model trained with key %s (%s): nothing to train -> %s", key, stored, output_dir)
    return result


def _keep_finished(settings: Settings, output_dir: Path, run_dir: Path, result: TrainResult) -> None:
    """Keep the finished model in the run's folder (for reuse), drop its checkpoints, prune old ones."""
    cfg = settings.train
    for checkpoint in run_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)  # the final model is saved: nothing left to resume
    if not cfg.cached_models:
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        return
    _copy_atomically(output_dir, run_dir / FINAL_MODEL, result)
    finished = [folder for folder in run_dir.parent.iterdir() if (folder / FINAL_MODEL / TRAIN_METRICS_FILE).is_file()]
    finished.sort(key=lambda f: (f / FINAL_MODEL / TRAIN_METRICS_FILE).stat().st_mtime, reverse=True)
    for old in finished[cfg.cached_models :]:
        log.info("removing the kept model %s (train.cached_models: %d)", old, cfg.cached_models)
        shutil.rmtree(old, ignore_errors=True)


def load_guide(
    settings: Settings, triplets_path: Path, student: SentenceTransformer, guide_ref: ModelRef, device: str, args: Any
) -> tuple[Any, str]:
    """The guide the loss uses: a guide-embedding cache (built once if needed) or the frozen model itself.

    ``triplets_path`` is the file the cache is built for (and checked against); the training file
    may be another one whose texts all occur in it (e.g. the ablation's noisy copies).
    """
    # deferred: the loss module imports torch and sentence-transformers
    from gist_core.training.loss import GuideEmbeddingCache

    cfg = settings.train
    if cfg.guide_cache:
        with args.main_process_first(local=False, desc="guide-embedding cache"):  # rank 0 builds, others read
            cached, manifest = load_or_build_guide_cache(
                settings.path(cfg.guide_cache_dir),
                triplets_path,
                student,
                guide_ref,
                device,
                dtype=cfg.guide_cache_dtype,
                store_root=store_root(settings),
            )
        description = {"guide": guide_ref.ref, "data_md5": manifest["identity"]["data_md5"]}
        cache = GuideEmbeddingCache(student, cached.index, cached.embeddings, student.max_seq_length, description)
        return cache, "cache"
    guide = load_sentence_transformer(guide_ref, cfg.max_seq_length, device)
    # A frozen guide: eval mode (no dropout) and no gradients, whatever state the loader left it in.
    guide.eval()
    guide.requires_grad_(False)
    return guide, "model"


def train(
    settings: Settings,
    triplets_path: Path,
    on_log: LogFn | None = None,
    callbacks: Sequence[Any] = (),
    guide_cache_for: Path | None = None,
) -> TrainResult:
    """Fine-tune the student on the triplets and save it to ``train.output_dir`` (rank 0).

    ``on_log(values, step)`` receives every training log on rank 0: loss, learning rate, grad norm,
    the fraction of in-batch candidates the guide masked (split by label when the triplets carry
    label columns), examples/s. ``callbacks`` are extra ``transformers.TrainerCallback`` objects.
    ``guide_cache_for``: the triplets file the guide-embedding cache is built for, when it is not
    ``triplets_path`` itself but covers all its texts (default: ``triplets_path``).
    """
    # deferred: the loss module imports torch and sentence-transformers
    from gist_core.training.loss import LabelledBatches, build_loss, mask_stats

    cfg = settings.train
    processes = world_size()
    student_ref, guide_ref = resolve_models(settings)
    data_md5 = file_md5(triplets_path)
    key = training_key(settings, data_md5, processes, student_ref, guide_ref)
    stored = stored_model(settings, key)
    if stored is not None:
        return _reuse(settings, stored, key)
    set_seed(settings.base.seed)
    device = pick_device()
    train_dataset = build_train_dataset(
        triplets_path, cfg.task_homogeneous_batches, settings.path(TRAIN_ARROW_DIR), data_md5=data_md5
    )
    small: dict[str, int] = {}
    if processes > 1 and cfg.task_homogeneous_batches:  # every global batch is complete under DDP
        # deferred: the samplers import sentence-transformers
        from gist_core.training.batching import report_unbatchable_tasks

        small = report_unbatchable_tasks(train_dataset, cfg.batch_size, processes, cfg.batch_sampler)
    student = load_sentence_transformer(student_ref, None, device)
    native_max_seq_length = student.max_seq_length
    student.max_seq_length = cfg.max_seq_length

    with _run_folder(settings, key) as run_dir:
        args = training_arguments(settings, run_dir, device, processes)
        guide, guide_kind = (None, "none")
        if cfg.loss == "gist":
            guide, guide_kind = load_guide(settings, guide_cache_for or triplets_path, student, guide_ref, device, args)
        loss = build_loss(cfg, student, guide, gather_across_devices=processes > 1)
        stats = mask_stats(loss)
        labels = text_labels(triplets_path)
        if stats is not None and labels:
            LabelledBatches(stats, student, labels).attach(loss)
        monitor = _TrainingMonitor(loss, cfg.batch_size * processes, on_log)
        trainer = trainer_class()(
            model=student,
            args=args,
            train_dataset=train_dataset,
            loss=loss,
            callbacks=[monitor.callback(), *callbacks],
        )
        resume = last_checkpoint(run_dir, remove_incomplete=trainer.is_world_process_zero()) if cfg.save_steps else None
        if resume is not None:
            log.info("resuming from %s", resume)
        started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        seconds = time.perf_counter() - started
        trainer.accelerator.wait_for_everyone()  # every rank is done with the checkpoints before rank 0 removes them
        log_history = list(trainer.state.log_history)

        output_dir = settings.path(cfg.output_dir)
        result = TrainResult(
            output_dir=output_dir,
            steps=int(output.global_step),
            train_loss=mean_train_loss(log_history),
            seconds=seconds,
            examples=int(output.global_step) * cfg.batch_size * processes,
            history=monitor.history(log_history),
            resumed_from=str(resume) if resume else None,
            world_size=processes,
            loss=type(loss).__name__,
            guide=guide_kind,
            gather_across_devices=bool(getattr(loss, "gather_across_devices", False)),
            skipped_tasks=small,
            key=key,
        )
        if not trainer.is_world_process_zero():
            return result
        # The checkpoint keeps the student's own max_seq_length: the training length is a speed setting,
        # and evaluation compares base and candidate under the same, published-comparable length.
        student.max_seq_length = native_max_seq_length
        _save_atomically(student, result, output_dir)
        if cfg.save_steps or cfg.cached_models:
            _keep_finished(settings, output_dir, run_dir, result)
    log.info("trained %d steps in %.1f s (loss %.4f) -> %s", result.steps, seconds, result.train_loss, output_dir)
    return result


def _save_atomically(student: SentenceTransformer, result: TrainResult, output_dir: Path) -> None:
    """Save the model and its metrics; the folder is either complete or absent."""
    _replace_folder(output_dir, result, student.save)


def _copy_atomically(source: Path, dest: Path, result: TrainResult) -> None:
    """Copy a saved model folder (its metrics rewritten from ``result``); complete or absent."""
    _replace_folder(dest, result, lambda staged: shutil.copytree(source, staged, dirs_exist_ok=True))


def _replace_folder(dest: Path, result: TrainResult, write: Callable[[str], Any]) -> None:
    with replaced_folder(dest) as staged:
        write(str(staged))
        (staged / TRAIN_METRICS_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n")  # last: complete
