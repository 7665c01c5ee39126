"""Evaluation-set contamination: training texts that appear in an evaluation split are found and removed.

The match is exact after ``normalize_text`` (lowercase, whitespace runs collapsed, ends stripped),
against the evaluation splits of the local tasks (``gist_core.catalogue``), read with the same
readers as the evaluation itself. ``normalize_texts`` is the same rule on a whole column at once
(Arrow kernels for ASCII texts, ``normalize_text`` itself for the rest), so the data stage never
runs Python per row to check a million texts; ``ContaminationIndex.match_column`` looks a column up.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from gist_core.catalogue import LOCAL_TASKS, SPECS, eval_split_texts
from gist_core.config import Settings

log = logging.getLogger(__name__)


def normalize_text(text: str) -> str:
    """Lowercase, whitespace runs collapsed to one space, ends stripped: the contamination match key."""
    return " ".join(text.split()).lower()


# What str.split() splits on among ASCII characters (\x1c-\x1f are whitespace to Python too).
_ASCII_WHITESPACE_RUN = "[\t\n\x0b\x0c\r\x1c-\x1f ]+"


def arrow_strings(values: pd.Series | pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    """A column of texts as an Arrow array (zero-copy for pandas' Arrow-backed strings)."""
    if isinstance(values, pa.ChunkedArray):
        return values
    if isinstance(values, pa.Array):
        return pa.chunked_array([values])
    array = values.array if isinstance(values, pd.Series) else values
    if hasattr(array, "__arrow_array__"):
        converted = pa.array(array)
    else:
        converted = pa.array(np.asarray(array, dtype=object), type=pa.large_string())
    return converted if isinstance(converted, pa.ChunkedArray) else pa.chunked_array([converted])


def normalize_texts(values: pd.Series | pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    """``normalize_text`` of every value of a column, vectorised; equal to it value by value.

    ASCII texts go through Arrow kernels (whitespace runs to one space, trimmed, lowercased: the
    same result as Python's rule on ASCII); any other text, whose case mapping and whitespace
    Python and Arrow may define differently, goes through ``normalize_text`` itself.
    """
    column = arrow_strings(values)
    out = pc.utf8_lower(pc.utf8_trim(pc.replace_substring_regex(column, _ASCII_WHITESPACE_RUN, " "), " "))
    other = np.flatnonzero(~pc.fill_null(pc.string_is_ascii(column), True).to_numpy(zero_copy_only=False))
    if len(other):
        exact = out.to_numpy(zero_copy_only=False).astype(object)
        texts = column.take(pa.array(other)).to_pylist()
        exact[other] = [normalize_text(t) for t in texts]
        out = pa.chunked_array([pa.array(exact, type=column.type)])
    return out


@dataclass
class ContaminationIndex:
    """Normalised texts of evaluation splits, each mapped to the first ``Task/split`` holding it."""

    where: dict[str, str]
    tasks: list[str]
    split_sizes: dict[str, int]
    not_checked: list[str] = field(default_factory=list)

    def match(self, text: str) -> str | None:
        return self.where.get(normalize_text(text))

    def match_column(self, values: pd.Series | pa.ChunkedArray) -> np.ndarray:
        """The ``Task/split`` each text of a column appears in (None where it appears in none), vectorised."""
        keys = list(self.where)
        if not keys:
            return np.full(len(values), None, dtype=object)
        found = pc.index_in(normalize_texts(values), value_set=pa.array(keys, type=pa.large_string()))
        positions = found.to_numpy(zero_copy_only=False)
        splits = np.array([self.where[k] for k in keys] + [None], dtype=object)
        return splits[np.where(np.isnan(positions), len(keys), positions).astype(np.int64)]

    def describe(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "not_checked": self.not_checked,
            "eval_texts": len(self.where),
            "split_sizes": dict(sorted(self.split_sizes.items())),
        }


def build_contamination_index(tasks: Iterable[str], data_dir: Path, local_only: bool = False) -> ContaminationIndex:
    """Index the evaluation splits of ``tasks``.

    With ``local_only`` (the tasks come from evaluate.tasks), tasks without a local copy (custom
    or ``mteb:`` tasks) are listed as not checked instead of failing.
    """
    where: dict[str, str] = {}
    sizes: dict[str, int] = {}
    checked, not_checked = [], []
    for task in tasks:
        if task not in SPECS and local_only:
            log.warning("contamination check: %s has no local copy; its texts are not checked", task)
            not_checked.append(task)
            continue
        checked.append(task)
        for split, texts in eval_split_texts(task, data_dir).items():
            sizes[split] = len(texts)
            for text in texts:
                key = normalize_text(text)
                if key:
                    where.setdefault(key, split)
    return ContaminationIndex(where, checked, sizes, not_checked)


def contamination_tasks(settings: Settings) -> tuple[list[str], bool]:
    """(tasks to check, whether tasks without a local copy are skipped).

    ``data.contamination.tasks`` when set; otherwise ``evaluate.tasks`` plus every mined source that
    is itself a local evaluation task (its own test splits), so the data stays clean when such a
    task is evaluated later.
    """
    configured = settings.data.contamination.tasks
    if configured is not None:
        return list(configured), False
    tasks = list(settings.evaluate.tasks)
    for source in settings.data.classification:
        if source.name in LOCAL_TASKS and source.name not in tasks and not settings.data.is_excluded(source.name):
            tasks.append(source.name)
    return tasks, True


def contamination_index(settings: Settings) -> ContaminationIndex:
    """The index of the evaluation texts the data stage checks against (``contamination_tasks``)."""
    tasks, local_only = contamination_tasks(settings)
    return build_contamination_index(tasks, settings.path(settings.evaluate.data_dir), local_only=local_only)
