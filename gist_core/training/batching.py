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

# Extra passes over a task's rows (each reshuffled) a split sampler may take to yield its advertised length.
MAX_EXTRA_PASSES = 8


class SplitBatchSampler(SetEpochMixin, BatchSampler):
    """Yields each batch of ``inner`` (``parts x batch_size`` samples) as ``parts`` consecutive batches.

    A pass yields exactly ``len(self)`` batches: under DDP every process must take the same number
    of steps, and a pass that ends early leaves one process waiting for the others forever (the
    known hang). When the inner no-duplicates sampler cannot fill its advertised number of full
    batches in one pass (many repeated texts), further reshuffled passes top it up; a task that
    cannot fill a single duplicate-free batch fails with its row count instead of hanging.
    """

    def __init__(self, inner: BatchSampler, parts: int) -> None:
        if inner.batch_size % parts:
            raise ValueError(f"inner batch size {inner.batch_size} is not a multiple of {parts}")
        super().__init__(inner.sampler, batch_size=inner.batch_size // parts, drop_last=True)
        self.inner = inner
        self.parts = parts

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        expected, yielded = len(self), 0
        epoch = getattr(self.inner, "epoch", self.epoch)
        for extra in range(MAX_EXTRA_PASSES + 1):
            if yielded >= expected:
                return
            if extra and hasattr(self.inner, "set_epoch"):
                self.inner.set_epoch(epoch + extra * 100_003)  # another shuffle, the same on every process
            full = 0
            for batch in self.inner:
                if len(batch) != self.batch_size * self.parts:
                    continue  # an incomplete batch cannot give every process a part
                full += 1
                for part in range(self.parts):
                    yield batch[part * self.batch_size : (part + 1) * self.batch_size]
                yielded += self.parts
                if yielded >= expected:
                    break
            if hasattr(self.inner, "set_epoch"):
                self.inner.set_epoch(epoch)
            if not full:
                break
        if yielded < expected:
            rows = len(self.inner.sampler) if hasattr(self.inner, "sampler") else "?"
            raise RuntimeError(
                f"a task of {rows} rows yielded {yielded} of {expected} batches of {self.batch_size} x {self.parts} "
                "without repeated texts: it has too few distinct texts for this batch size (lower train.batch_size)"
            )

    def __len__(self) -> int:
        return len(self.inner) * self.parts


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
