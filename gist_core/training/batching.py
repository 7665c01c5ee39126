"""Batch samplers for training on several processes, keeping the paper's batches across all of them.

On one process, sentence-transformers' own samplers already give GISTEmbed's batches: the
``PROPORTIONAL`` multi-dataset sampler draws each batch from one task (one dataset per
``task_name``) and ``NO_DUPLICATES`` keeps any text from appearing twice in it.

With ``N`` processes and in-batch negatives gathered across them, the batch the loss contrasts is
the union of ``N`` per-process batches. The data loader hands consecutive batches to processes in
turn (batch ``i`` to rank ``i % N``), so here each task draws one batch of ``N x batch_size`` with
no duplicates and yields it as ``N`` consecutive parts: every process gets a part of the same
task's batch at the same step, and no text repeats across the gathered batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate, islice
from typing import Any

from sentence_transformers.base.sampler import (
    DefaultBatchSampler,
    MultiDatasetDefaultBatchSampler,
    NoDuplicatesBatchSampler,
    SetEpochMixin,
)
from torch.utils.data import BatchSampler, ConcatDataset, RandomSampler, SubsetRandomSampler

log = logging.getLogger(__name__)

# Extra passes over a task's rows (each reshuffled) a split sampler may take to yield its advertised length.
MAX_EXTRA_PASSES = 2


def first_full_batch(dataset: Any, size: int, no_duplicates: bool = True) -> list[int] | None:
    """The first ``size`` rows in file order that share no text (greedy), or None when the rows cannot give one.

    Reads the rows in slices, so checking a task costs milliseconds. A task with enough rows but
    too many repeated texts (every large enough set of rows repeats one) has no such batch.
    """
    if len(dataset) < size:
        return None
    if not no_duplicates:
        return list(range(size))
    columns = [c for c in dataset.column_names if c != "dataset_name"]
    seen: set[str] = set()
    batch: list[int] = []
    for begin in range(0, len(dataset), 1024):
        part = dataset[begin : begin + 1024]
        for offset, values in enumerate(zip(*(part[c] for c in columns), strict=True)):
            texts = {str(v) for v in values}
            if len(texts) < len(values) or not seen.isdisjoint(texts):
                continue
            seen.update(texts)
            batch.append(begin + offset)
            if len(batch) == size:
                return batch
    return None


class SplitBatchSampler(SetEpochMixin, BatchSampler):
    """Yields each batch of ``inner`` (``parts x batch_size`` samples) as ``parts`` consecutive batches.

    A pass yields exactly ``len(self)`` batches: under DDP every process must take the same number
    of steps, and a pass that ends early leaves one process waiting for the others forever (the
    known hang). When the inner no-duplicates sampler cannot fill its advertised number of full
    batches in one pass (many repeated texts), further reshuffled passes top it up, and as a last
    resort full batches already drawn in this pass are drawn again. A task that cannot give a single
    duplicate-free global batch (too few rows, or too many repeated texts) advertises no batch at
    all; the trainer reports such tasks with their row counts (``unbatchable_tasks``).
    """

    def __init__(self, inner: BatchSampler, parts: int) -> None:
        if inner.batch_size % parts:
            raise ValueError(f"inner batch size {inner.batch_size} is not a multiple of {parts}")
        super().__init__(inner.sampler, batch_size=inner.batch_size // parts, drop_last=True)
        self.inner = inner
        self.parts = parts
        dataset = getattr(inner, "dataset", inner.sampler)
        no_duplicates = isinstance(inner, NoDuplicatesBatchSampler)
        self.fallback = (
            first_full_batch(dataset, inner.batch_size, no_duplicates) if hasattr(dataset, "column_names") else None
        )
        if self.fallback is None and not hasattr(dataset, "column_names") and len(inner.sampler) >= inner.batch_size:
            self.fallback = list(range(inner.batch_size))
        self.length = len(inner) if self.fallback is not None else 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def _full_batches(self) -> Iterator[list[int]]:
        """Full inner batches: one pass, then reshuffled extra passes, then this pass's batches again."""
        epoch = getattr(self.inner, "epoch", self.epoch)
        drawn: list[list[int]] = []
        for extra in range(MAX_EXTRA_PASSES + 1):
            if extra and hasattr(self.inner, "set_epoch"):
                self.inner.set_epoch(epoch + extra * 100_003)  # another shuffle, the same on every process
            full = 0
            try:
                for batch in self.inner:
                    if len(batch) == self.batch_size * self.parts:  # an incomplete batch cannot be split
                        full += 1
                        drawn.append(batch)
                        yield batch
            finally:
                if hasattr(self.inner, "set_epoch"):
                    self.inner.set_epoch(epoch)
            if not full:
                break
        log.warning("a task's passes gave too few duplicate-free batches: repeating batches of this epoch")
        while True:
            yield from drawn or [self.fallback or []]

    def __iter__(self) -> Iterator[list[int]]:
        if not self.length:
            return
        for count, batch in enumerate(self._full_batches(), start=1):
            for part in range(self.parts):
                yield batch[part * self.batch_size : (part + 1) * self.batch_size]
            if count == self.length:
                return

    def __len__(self) -> int:
        return self.length * self.parts


def unbatchable_tasks(datasets: dict[str, Any], global_batch: int, no_duplicates: bool = True) -> dict[str, int]:
    """Tasks (with their row counts) that cannot give one duplicate-free batch of ``global_batch`` rows."""
    return {
        name: len(data)
        for name, data in datasets.items()
        if first_full_batch(data, global_batch, no_duplicates) is None
    }


def report_unbatchable_tasks(datasets: dict[str, Any], batch_size: int, processes: int, sampler: str) -> dict[str, int]:
    """``unbatchable_tasks`` for a run of ``processes`` ranks, each logged: reported, never dropped silently."""
    small = unbatchable_tasks(datasets, batch_size * processes, sampler != "batch_sampler")
    for task, rows in small.items():
        log.warning(
            "task %s: its %d rows cannot give one batch of %d x %d processes without a repeated text: "
            "no batch of it is trained on",
            task,
            rows,
            batch_size,
            processes,
        )
    return small


@dataclass(frozen=True)
class SplitBatchSamplerFactory:
    """A ``batch_sampler`` for the training arguments: ``kind`` batches ``parts`` times as large, split.

    A picklable callable (the trainer pickles its arguments into every checkpoint).
    """

    kind: str
    parts: int

    def __call__(
        self,
        dataset: Any,
        batch_size: int,
        drop_last: bool,
        valid_label_columns: list[str] | None = None,
        generator: Any = None,
        seed: int = 0,
    ) -> BatchSampler:
        kwargs = {
            "batch_size": batch_size * self.parts,
            "drop_last": True,
            "valid_label_columns": valid_label_columns,
            "generator": generator,
            "seed": seed,
        }
        if self.kind in ("no_duplicates", "no_duplicates_hashed"):
            hashed = self.kind == "no_duplicates_hashed"
            inner: BatchSampler = NoDuplicatesBatchSampler(dataset, **kwargs, precompute_hashes=hashed)
        else:
            inner = DefaultBatchSampler(RandomSampler(dataset, generator=generator), **kwargs)
        return SplitBatchSampler(inner, self.parts)


class GroupedProportionalBatchSampler(MultiDatasetDefaultBatchSampler):
    """``ProportionalBatchSampler`` that yields ``parts`` consecutive batches from the same dataset.

    Each per-dataset sampler is a ``SplitBatchSampler`` with the same ``parts``, so a group is one
    split batch: one task, no duplicates across the group.
    """

    def __init__(
        self,
        dataset: ConcatDataset,
        batch_samplers: list[BatchSampler],
        generator: Any = None,
        seed: int = 0,
        parts: int = 1,
    ) -> None:
        super().__init__(dataset, batch_samplers, generator=generator, seed=seed)
        self.parts = parts

    def __iter__(self) -> Iterator[list[int]]:
        if self.generator and self.seed is not None:
            self.generator.manual_seed(self.seed + self.epoch)
        offsets = [0, *accumulate(len(d) for d in self.dataset.datasets)]
        groups = [len(sampler) // self.parts for sampler in self.batch_samplers]
        dataset_indices = [idx for idx, count in enumerate(groups) for _ in range(count)]
        iterators = [iter(sampler) for sampler in self.batch_samplers]
        for dataset_idx in SubsetRandomSampler(dataset_indices, generator=self.generator):
            group = list(islice(iterators[dataset_idx], self.parts))
            if len(group) < self.parts:  # cannot happen: a SplitBatchSampler yields its whole length
                raise RuntimeError(f"dataset {dataset_idx} ran out of batches before its advertised length")
            for batch in group:
                yield [idx + offsets[dataset_idx] for idx in batch]

    def __len__(self) -> int:
        return sum(len(sampler) // self.parts * self.parts for sampler in self.batch_samplers)


@dataclass(frozen=True)
class GroupedProportionalFactory:
    """A ``multi_dataset_batch_sampler`` for the training arguments (picklable, like the one above)."""

    parts: int

    def __call__(
        self, dataset: ConcatDataset, batch_samplers: list[BatchSampler], generator: Any = None, seed: int = 0
    ) -> MultiDatasetDefaultBatchSampler:
        return GroupedProportionalBatchSampler(
            dataset, batch_samplers, generator=generator, seed=seed, parts=self.parts
        )
