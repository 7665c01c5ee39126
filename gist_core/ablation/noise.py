"""Noise injection: a controlled share of the triplets corrupted the way mined data goes wrong.

A positive replaced by a text of another label of the same task (an unrelated text), or a negative
replaced by another text of the anchor's own label (a false negative). Replacements come from the
triplets' own texts, so one guide-embedding cache of the clean data serves every noise level, and
each corrupted row is written to a CSV beside the noisy file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from gist_core.errors import DataError


@dataclass(frozen=True)
class NoiseReport:
    level: float
    seed: int
    rows: int
    eligible: int  # rows with labels, which can be corrupted
    corrupted_positive: int
    corrupted_negative: int
    no_replacement: int  # chosen rows left as they were: their task had no text to swap in

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inject_noise(
    frame: pd.DataFrame, level: float, seed: int, positive_share: float = 0.5
) -> tuple[pd.DataFrame, pd.DataFrame, NoiseReport]:
    """Corrupt ``round(level * rows)`` triplets; return the noisy frame, the corrupted rows and the counts.

    Of the chosen rows, ``positive_share`` get their positive replaced by a text of the same task
    with another label; the rest get their negative replaced by another text of the anchor's label
    (neither the anchor nor its positive). Only rows with an anchor label can be corrupted; if
    fewer are eligible than asked, all of them are. The label columns follow the replacement and
    the guide's similarity columns of a corrupted row become NaN (no longer measured).
    """
    if not 0 <= level < 1:
        raise ValueError(f"noise level must be in [0, 1), got {level}")
    needed = {"anchor", "positive", "negative", "task_name", "anchor_label", "positive_label", "negative_label"}
    missing = sorted(needed - set(frame.columns))
    if missing:
        raise DataError(f"noise injection needs label columns; the triplets lack {missing}")
    out = frame.reset_index(drop=True).copy()
    out["noise"] = ""
    rng = np.random.default_rng(seed)
    labelled = out["anchor_label"].notna() & (out["anchor_label"].astype(str) != "")
    eligible = np.flatnonzero(labelled.to_numpy())
    wanted = min(round(level * len(out)), len(eligible))
    chosen = rng.choice(eligible, size=wanted, replace=False) if wanted else np.array([], dtype=int)
    n_positive = round(wanted * positive_share)

    # Every labelled text of each task, by label: the pool replacements are drawn from.
    pool: dict[str, dict[str, list[str]]] = {}
    for text_col, label_col in (
        ("anchor", "anchor_label"),
        ("positive", "positive_label"),
        ("negative", "negative_label"),
    ):
        for task, text, label in zip(out["task_name"], out[text_col], out[label_col], strict=True):
            if isinstance(label, str) and label:
                pool.setdefault(task, {}).setdefault(label, []).append(text)
    by_task = {task: {label: sorted(set(texts)) for label, texts in labels.items()} for task, labels in pool.items()}

    log_rows: list[dict[str, Any]] = []
    counts = {"positive": 0, "negative": 0, "none": 0}
    for i, row_index in enumerate(chosen.tolist()):
        row = out.loc[row_index]
        kind = "positive" if i < n_positive else "negative"
        labels = by_task.get(row["task_name"], {})
        anchor_label = row["anchor_label"]
        if kind == "positive":
            others = [label for label in labels if label != anchor_label]
            label = others[rng.integers(len(others))] if others else None
            candidates = labels.get(label, []) if label is not None else []
        else:
            label = anchor_label
            candidates = [t for t in labels.get(label, []) if t not in (row["anchor"], row["positive"])]
        if not candidates:
            counts["none"] += 1
            continue
        text = candidates[rng.integers(len(candidates))]
        log_rows.append(
            {
                "row": row_index,
                "task_name": row["task_name"],
                "kind": kind,
                "was": row[kind],
                "now": text,
                "anchor_label": anchor_label,
                "was_label": row[f"{kind}_label"],
                "now_label": label,
            }
        )
        out.at[row_index, kind] = text
        out.at[row_index, f"{kind}_label"] = label
        out.at[row_index, "noise"] = kind
        for column in ("guide_pos_sim", "guide_neg_sim"):
            if column in out.columns:
                out.at[row_index, column] = float("nan")
        counts[kind] += 1
    report = NoiseReport(
        level=level,
        seed=seed,
        rows=len(out),
        eligible=len(eligible),
        corrupted_positive=counts["positive"],
        corrupted_negative=counts["negative"],
        no_replacement=counts["none"],
    )
    corrupted = pd.DataFrame(
        log_rows, columns=["row", "task_name", "kind", "was", "now", "anchor_label", "was_label", "now_label"]
    )
    return out, corrupted, report


def subset_per_task(frame: pd.DataFrame, per_task: int | None, seed: int) -> pd.DataFrame:
    """A seeded sample of at most ``per_task`` triplets of each task (all of them for None), order kept."""
    if per_task is None:
        return frame
    keep = [
        group.sample(n=min(per_task, len(group)), random_state=seed).index
        for _, group in frame.groupby("task_name", sort=True)
    ]
    return frame.loc[sorted(np.concatenate(keep).tolist())].reset_index(drop=True)
