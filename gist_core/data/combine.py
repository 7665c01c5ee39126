"""The DVC ``data`` stage's work: the mined triplets and MEDI combined, checked, capped, scored and written.

Union, then contamination (rows with a text of an evaluation split), exact duplicates, the
per-task cap (``data.max_per_task``) and the guide's verdict on every kept row; every removed row
is counted in its source's bucket (``gist_core.data.audit``) and listed with its reason.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from gist_core.config import DataSettings
from gist_core.data.audit import DataReport, SourceReport, render_markdown, similarity_summary
from gist_core.data.contamination import ContaminationIndex
from gist_core.data.guide_encoder import GuideEncoder
from gist_core.data.medi import MediData, load_medi
from gist_core.data.mine import Mined, mine_all
from gist_core.data.mining import row_similarity
from gist_core.data.schema import OUTPUT_COLUMNS, triplet_table
from gist_core.hashing import seed_for
from gist_core.readers import SkippedRow, skipped_row, write_skipped

log = logging.getLogger(__name__)


def _medi_frame(medi: MediData) -> pd.DataFrame:
    frame = medi.triplets.rename(columns={"row": "source_row"}).assign(source=medi.report.name)
    for column in ("anchor_label", "positive_label", "negative_label"):
        frame[column] = None
    for column in ("guide_pos_sim", "guide_neg_sim"):
        frame[column] = np.float32(np.nan)
    return frame[OUTPUT_COLUMNS]


def _remove(
    data: pd.DataFrame,
    mask: pd.Series,
    reports: dict[str, SourceReport],
    skipped: list[SkippedRow],
    bucket: str,
    reasons: pd.Series | str,
    fld: str | pd.Series = "anchor",
) -> pd.DataFrame:
    """Drop ``mask`` rows, counting each in its source's ``bucket`` and listing it as skipped."""
    if not mask.any():
        return data
    removed = data[mask]
    why = reasons[mask] if isinstance(reasons, pd.Series) else pd.Series(reasons, index=removed.index)
    where = fld[mask] if isinstance(fld, pd.Series) else pd.Series(fld, index=removed.index)
    for source, row, text, reason, column in zip(
        removed["source"], removed["source_row"], removed["anchor"], why, where, strict=True
    ):
        report = reports[source]
        report.count(bucket, reason)
        skipped.append(skipped_row(report.file, row, column, reason, text))
    return data[~mask]


def combine(
    mined: Mined,
    medi: MediData | None,
    settings: DataSettings,
    seed: int,
    guide: GuideEncoder | None = None,
    contamination: ContaminationIndex | None = None,
) -> tuple[pd.DataFrame, DataReport, list[SkippedRow]]:
    """Union, decontaminate, deduplicate, cap and score: the final training triplets and their report."""
    reports = [SourceReport.from_dict(asdict(r)) for r in mined.reports]  # do not mutate the input
    skipped = list(mined.skipped)
    frames = [mined.triplets[OUTPUT_COLUMNS]]
    if medi is not None:
        reports.append(SourceReport.from_dict(asdict(medi.report)))
        skipped.extend(medi.skipped)
        frames.append(_medi_frame(medi))
    by_name = {r.name: r for r in reports}
    data = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else frames[0]

    found = Counter(mined.contamination)
    if contamination is not None and len(data):
        where = pd.Series(None, index=data.index, dtype=object)
        column = pd.Series(None, index=data.index, dtype=object)
        for col in ("anchor", "positive", "negative"):
            hit = data[col].map(contamination.match)
            new = where.isna() & hit.notna()
            where[new], column[new] = hit[new], col
        hit = where.notna()
        found.update(where[hit].tolist())
        if settings.contamination.remove:
            reasons = "text in evaluation split " + where.fillna("")
            data = _remove(data, hit, by_name, skipped, "decontaminated", reasons, column)

    dupes = data.duplicated(subset=["anchor", "positive", "negative"], keep="first")
    data = _remove(data, dupes, by_name, skipped, "duplicates", "duplicate triplet")

    if settings.max_per_task is not None:
        over = pd.Series(False, index=data.index)
        for task, index in sorted(data.groupby("task_name", sort=False).groups.items()):
            if len(index) > settings.max_per_task:
                rng = np.random.default_rng(seed_for(seed, f"{task}:cap"))
                keep = rng.choice(len(index), size=settings.max_per_task, replace=False)
                over[index] = True
                over[index[keep]] = False
        for source, count in data.loc[over, "source"].value_counts().items():
            by_name[str(source)].count("not_sampled", "over data.max_per_task", int(count))
        data = data[~over]
    data = data.reset_index(drop=True)

    if settings.audit.guide_verdicts and guide is not None:
        todo = data["guide_pos_sim"].isna() | data["guide_neg_sim"].isna()
        if todo.any():
            part = data[todo]
            texts = list(dict.fromkeys([*part["anchor"], *part["positive"], *part["negative"]]))
            embeddings = guide.embed(texts)
            index = {t: i for i, t in enumerate(texts)}
            a, p, n = (part[c].map(index).to_numpy() for c in ("anchor", "positive", "negative"))
            data.loc[todo, "guide_pos_sim"] = row_similarity(embeddings, a, p)
            data.loc[todo, "guide_neg_sim"] = row_similarity(embeddings, a, n)
    data["guide_pos_sim"] = data["guide_pos_sim"].astype(np.float32)
    data["guide_neg_sim"] = data["guide_neg_sim"].astype(np.float32)

    for report in reports:
        mine = data["source"] == report.name
        report.kept = int(mine.sum())
        similarity_summary(
            report, data.loc[mine, "guide_pos_sim"].to_numpy(), data.loc[mine, "guide_neg_sim"].to_numpy()
        )
    flagged = data[data["guide_neg_sim"] >= data["guide_pos_sim"]].head(settings.audit.examples)
    examples = [
        {
            "task_name": r.task_name,
            "anchor": r.anchor,
            "positive": r.positive,
            "negative": r.negative,
            "guide_pos_sim": round(float(r.guide_pos_sim), 4),
            "guide_neg_sim": round(float(r.guide_neg_sim), 4),
        }
        for r in flagged.itertuples()
    ]
    report = DataReport(
        sources=reports,
        rows_per_task={str(k): int(v) for k, v in data["task_name"].value_counts().items()},
        contamination={
            **(contamination.describe() if contamination is not None else {"tasks": None}),
            "remove": settings.contamination.remove,
            "rows": int(sum(found.values())),
            "by_split": dict(sorted(found.items())),
        },
        guide=mined.guide or ({"name": guide.name, "fingerprint": guide.fingerprint} if guide is not None else {}),
        flagged_examples=examples,
    )
    report.check_identity()
    return data[OUTPUT_COLUMNS], report, skipped


def prepare_data(
    settings: DataSettings,
    root: Path,
    seed: int,
    guide: GuideEncoder | None = None,
    contamination: ContaminationIndex | None = None,
) -> tuple[pd.DataFrame, DataReport, list[SkippedRow]]:
    """Both steps in memory: mine the classification sources, load MEDI, combine and audit.

    ``guide`` is required for ``mining.positive_strategy: guide_topk`` and gives every kept
    triplet the guide's verdict; without ``contamination`` nothing is checked against evaluation
    splits. The stages build both from the settings (``mine_stage``, ``combine_stage``).
    """
    mined = mine_all(settings, root, seed, guide, contamination)
    medi = load_configured_medi(settings, root)
    return combine(mined, medi, settings, seed, guide, contamination)


def load_configured_medi(settings: DataSettings, root: Path) -> MediData | None:
    """MEDI as ``data.medi`` configures it, or None when it is not configured."""
    if settings.medi is None:
        return None
    return load_medi(settings.medi, root, settings.max_text_chars, settings.max_bad_fraction)


def write_outputs(
    data: pd.DataFrame,
    report: DataReport,
    skipped: list[SkippedRow],
    output: Path,
    report_path: Path,
    quarantine: Path,
    markdown: Path | None = None,
) -> None:
    """Write the triplets (Parquet), the report (JSON metrics, Markdown) and removed rows (CSV), deterministically."""
    for path in (output, report_path, quarantine, *([markdown] if markdown else [])):
        path.parent.mkdir(parents=True, exist_ok=True)
    frame = data.copy()
    for column in OUTPUT_COLUMNS:
        if column not in frame.columns:  # triplets built elsewhere: fill the optional columns
            frame[column] = np.float32(np.nan) if column.startswith("guide_") else None
    if frame["source_row"].isna().any():
        frame["source_row"] = frame["source_row"].fillna(0)
    tmp = output.with_suffix(output.suffix + ".tmp")
    pq.write_table(triplet_table(frame), tmp)
    tmp.replace(output)
    report_path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    write_skipped(skipped, quarantine)
    if markdown is not None:
        markdown.write_text(render_markdown(report))
