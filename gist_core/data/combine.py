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
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gist_core.config import DataSettings
from gist_core.data.audit import DataReport, SourceReport, render_markdown, similarity_summary
from gist_core.data.contamination import ContaminationIndex, arrow_strings
from gist_core.data.guide_encoder import TextEmbedder
from gist_core.data.medi import MediData, load_medi
from gist_core.data.mine import Mined, mine_all
from gist_core.data.mining import row_similarity
from gist_core.data.schema import OUTPUT_COLUMNS, TEXT_COLUMNS, schema, triplet_table
from gist_core.hashing import seed_for
from gist_core.readers import QUARANTINE_COLUMNS, SkippedRow, skipped_frame, write_skipped

log = logging.getLogger(__name__)


VERDICT_CHUNK = 65_536  # rows scored by the guide at a time
WRITE_ROWS = 131_072  # rows per Parquet row group of the output


def _medi_frame(medi: MediData) -> pd.DataFrame:
    frame = medi.triplets.rename(columns={"row": "source_row"}).assign(source=medi.report.name)
    for column in ("anchor_label", "positive_label", "negative_label"):
        frame[column] = pd.Series(pd.NA, index=frame.index, dtype="str")
    for column in ("guide_pos_sim", "guide_neg_sim"):
        frame[column] = np.float32(np.nan)
    return frame[OUTPUT_COLUMNS]


def _remove(
    data: pd.DataFrame,
    mask: np.ndarray,
    reports: dict[str, SourceReport],
    removed: list[pd.DataFrame],
    bucket: str,
    reasons: pd.Series | str,
    fld: pd.Series | str = "anchor",
) -> pd.DataFrame:
    """Drop ``mask`` rows, counting each in its source's ``bucket`` and listing it, all vectorised."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return data
    gone = data[mask]
    why = reasons[mask].reset_index(drop=True) if isinstance(reasons, pd.Series) else reasons
    where = fld[mask].reset_index(drop=True) if isinstance(fld, pd.Series) else fld
    files = gone["source"].map({name: r.file for name, r in reports.items()}).reset_index(drop=True)
    frame = skipped_frame(files.astype(object), gone["source_row"].to_numpy(), where, why, gone["anchor"])
    removed.append(frame)
    counts = pd.DataFrame({"source": gone["source"].to_numpy(dtype=object), "reason": frame["reason"]})
    for (source, reason), n in counts.value_counts(sort=False).items():
        reports[str(source)].count(bucket, str(reason), int(n))
    return data[~mask]


def _duplicated(data: pd.DataFrame) -> np.ndarray:
    """Rows that repeat an earlier row's (anchor, positive, negative), via Arrow's hash-based dictionary codes."""
    codes = [
        pc.dictionary_encode(arrow_strings(data[c])).combine_chunks().indices.to_numpy(zero_copy_only=False)
        for c in TEXT_COLUMNS
    ]
    return pd.DataFrame(dict(zip(TEXT_COLUMNS, codes, strict=True))).duplicated(keep="first").to_numpy()


def _guide_verdicts(data: pd.DataFrame, guide: TextEmbedder) -> None:
    """Score rows without a verdict: the guide's sim(anchor, positive) and sim(anchor, negative), in chunks."""
    todo = np.flatnonzero((data["guide_pos_sim"].isna() | data["guide_neg_sim"].isna()).to_numpy())
    pos = data["guide_pos_sim"].to_numpy(dtype=np.float32, copy=True)
    neg = data["guide_neg_sim"].to_numpy(dtype=np.float32, copy=True)
    for begin in range(0, len(todo), VERDICT_CHUNK):
        rows = todo[begin : begin + VERDICT_CHUNK]
        part = data.iloc[rows]
        columns = [arrow_strings(part[c]) for c in TEXT_COLUMNS]
        texts = pa.chunked_array([chunk for column in columns for chunk in column.chunks]).unique()
        embeddings = guide.embed(texts.to_pylist(), pass_name="verdicts")
        a, p, n = (pc.index_in(column, value_set=texts).to_numpy(zero_copy_only=False) for column in columns)
        pos[rows] = row_similarity(embeddings, a.astype(np.int64), p.astype(np.int64))
        neg[rows] = row_similarity(embeddings, a.astype(np.int64), n.astype(np.int64))
        log.info("guide verdicts: %d of %d rows scored", min(begin + VERDICT_CHUNK, len(todo)), len(todo))
    data["guide_pos_sim"] = pos
    data["guide_neg_sim"] = neg


def combine(
    mined: Mined,
    medi: MediData | None,
    settings: DataSettings,
    seed: int,
    guide: TextEmbedder | None = None,
    contamination: ContaminationIndex | None = None,
) -> tuple[pd.DataFrame, DataReport, pd.DataFrame]:
    """Union, decontaminate, deduplicate, cap and score: the final training triplets, their report, the removed rows.

    Every step is vectorised (Arrow kernels, numpy), so its cost per row is a few machine
    instructions and its memory a few arrays beside the triplets.
    """
    reports = [SourceReport.from_dict(asdict(r)) for r in mined.reports]  # do not mutate the input
    removed: list[pd.DataFrame] = [pd.DataFrame([vars(s) for s in mined.skipped], columns=QUARANTINE_COLUMNS)]
    frames = [mined.triplets[OUTPUT_COLUMNS]]
    if medi is not None:
        reports.append(SourceReport.from_dict(asdict(medi.report)))
        removed.append(medi.removed())
        frames.append(_medi_frame(medi))
    by_name = {r.name: r for r in reports}
    data = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else frames[0]

    found = Counter(mined.contamination)
    if contamination is not None and len(data):
        where = np.full(len(data), None, dtype=object)
        column = np.full(len(data), None, dtype=object)
        for col in TEXT_COLUMNS:
            hit = contamination.match_column(data[col])
            new = pd.isna(where) & ~pd.isna(hit)
            where[new], column[new] = hit[new], col
        hit = ~pd.isna(where)
        found.update(pd.Series(where[hit], dtype=object).value_counts().to_dict())
        if settings.contamination.remove:
            reasons = pd.Series("text in evaluation split " + pd.Series(where, dtype=object).fillna(""), dtype=object)
            data = _remove(data, hit, by_name, removed, "decontaminated", reasons, pd.Series(column, dtype=object))

    data = _remove(data, _duplicated(data), by_name, removed, "duplicates", "duplicate triplet")

    if settings.max_per_task is not None:
        over = np.zeros(len(data), dtype=bool)
        for task, index in sorted(data.groupby("task_name", sort=False).indices.items()):
            if len(index) > settings.max_per_task:
                rng = np.random.default_rng(seed_for(seed, f"{task}:cap"))
                keep = rng.choice(len(index), size=settings.max_per_task, replace=False)
                over[index] = True
                over[index[keep]] = False
        for source, count in data.loc[over, "source"].value_counts().items():
            by_name[str(source)].count("not_sampled", "over data.max_per_task", int(count))
        data = data[~over]
    data = data.reset_index(drop=True)

    if settings.audit.guide_verdicts and guide is not None and len(data):
        _guide_verdicts(data, guide)
    data["guide_pos_sim"] = data["guide_pos_sim"].astype(np.float32)
    data["guide_neg_sim"] = data["guide_neg_sim"].astype(np.float32)

    sources = data["source"].to_numpy(dtype=object)
    for report in reports:
        mine = sources == report.name
        report.kept = int(mine.sum())
        similarity_summary(report, data["guide_pos_sim"].to_numpy()[mine], data["guide_neg_sim"].to_numpy()[mine])
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
    skipped = pd.concat([f for f in removed if len(f)] or removed[:1], ignore_index=True)
    return data[OUTPUT_COLUMNS], report, skipped


def prepare_data(
    settings: DataSettings,
    root: Path,
    seed: int,
    guide: TextEmbedder | None = None,
    contamination: ContaminationIndex | None = None,
) -> tuple[pd.DataFrame, DataReport, pd.DataFrame]:
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
    skipped: pd.DataFrame | list[SkippedRow],
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
    with pq.ParquetWriter(tmp, schema()) as writer:  # in row groups: no second full copy of the table
        for begin in range(0, len(frame), WRITE_ROWS):
            writer.write_table(triplet_table(frame.iloc[begin : begin + WRITE_ROWS]), row_group_size=WRITE_ROWS)
    tmp.replace(output)
    report_path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    if isinstance(skipped, pd.DataFrame):
        write_skipped([], quarantine, [skipped])
    else:
        write_skipped(skipped, quarantine)
    if markdown is not None:
        markdown.write_text(render_markdown(report))
