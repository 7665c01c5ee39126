"""Evaluation-set contamination: training texts that appear in an evaluation split are found and removed.

The match is exact after ``normalize_text`` (lowercase, whitespace runs collapsed, ends stripped),
against the evaluation splits of the local tasks (``gist_core.catalogue``), read with the same
readers as the evaluation itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gist_core.catalogue import LOCAL_TASKS, SPECS, eval_split_texts
from gist_core.config import Settings

log = logging.getLogger(__name__)


def normalize_text(text: str) -> str:
    """Lowercase, whitespace runs collapsed to one space, ends stripped: the contamination match key."""
    return " ".join(text.split()).lower()


@dataclass
class ContaminationIndex:
    """Normalised texts of evaluation splits, each mapped to the first ``Task/split`` holding it."""

    where: dict[str, str]
    tasks: list[str]
    split_sizes: dict[str, int]
    not_checked: list[str] = field(default_factory=list)

    def match(self, text: str) -> str | None:
        return self.where.get(normalize_text(text))

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
