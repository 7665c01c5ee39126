"""Training data: classification train splits mined into triplets, MEDI, combined, audited and written.

Two steps, which are also the two DVC stages:

1. ``mine`` (``mine_stage``): read and validate each classification source, drop texts found in
   an evaluation split, sample a pool of ``mining.max_texts_per_task`` texts, and mine one
   (anchor, positive, negative) triplet per text with the guide (``gist_core.mining``). Writes
   ``data.mined`` (a folder: triplets, skipped rows, row accounting).
2. ``data`` (``combine_stage``): union the mined triplets with MEDI (when configured), check
   contamination again, remove exact duplicates, cap each task, score every kept triplet with the
   guide, and write the training triplets (``data.output``), the report (``data.report`` JSON
   metrics + ``data.report_markdown``) and every removed row (``data.quarantine``).

Every input row ends in exactly one bucket (``gist_core.audit``), checked in code. The training
file keeps the contract ``anchor, positive, negative, task_name`` and adds ``source``,
``source_row``, the three labels (classification rows) and the guide's similarities.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from gist_core.audit import (
    QUARANTINE_COLUMNS,
    ContaminationIndex,
    DataReport,
    SkippedRow,
    SourceReport,
    build_contamination_index,
    label_problem,
    label_text,
    similarity_summary,
    skipped_row,
    text_problem,
)
from gist_core.config import ClassificationSource, DataSettings
from gist_core.errors import DataError
from gist_core.mining import GuideEncoder, guided_positives, other_label_partner, row_similarity, same_label_partner

if TYPE_CHECKING:
    import pyarrow as pa

    from gist_core.config import Settings
    from gist_core.medi import MediData

log = logging.getLogger(__name__)

__all__ = [
    "TRIPLET_COLUMNS",
    "DataReport",
    "DataSettings",
    "Mined",
    "SkippedRow",
    "SourceReport",
    "combine",
    "combine_stage",
    "load_triplets",
    "mine_all",
    "mine_stage",
    "prepare_data",
    "read_classification_source",
    "write_outputs",
]

TRIPLET_COLUMNS = ["anchor", "positive", "negative", "task_name"]
OUTPUT_COLUMNS = [
    *TRIPLET_COLUMNS,
    "source",
    "source_row",
    "anchor_label",
    "positive_label",
    "negative_label",
    "guide_pos_sim",
    "guide_neg_sim",
]
MINED_TRIPLETS = "triplets.parquet"
MINED_SKIPPED = "skipped.csv"
MINED_REPORT = "report.json"


def _schema() -> pa.Schema:
    import pyarrow as pa

    text = [pa.field(c, pa.string()) for c in (*TRIPLET_COLUMNS, "source")]
    labels = [pa.field(c, pa.string()) for c in ("anchor_label", "positive_label", "negative_label")]
    sims = [pa.field(c, pa.float32()) for c in ("guide_pos_sim", "guide_neg_sim")]
    return pa.schema([*text, pa.field("source_row", pa.int64()), *labels, *sims])


def _table(frame: pd.DataFrame) -> pa.Table:
    """The output columns as an Arrow table without pandas metadata: the bytes depend only on the values."""
    import pyarrow as pa

    table = pa.Table.from_pandas(frame[OUTPUT_COLUMNS], schema=_schema(), preserve_index=False)
    return table.replace_schema_metadata(None)


def _task_seed(seed: int, name: str) -> int:
    """A per-task, per-purpose seed that does not depend on the order of sources in params.yaml."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


# ---------------------------------------------------------------- reading classification sources


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read: {err}") from None
    text = raw.decode("utf-8", errors="surrogateescape")  # bad bytes are found per row (audit.text_problem)
    return text[1:] if text.startswith("\ufeff") else text


def _read_lastsep(path: Path, source: ClassificationSource, skipped: list[SkippedRow]) -> pd.DataFrame:
    """Lines of ``text<sep>label`` with a header; split on the last separator (texts may contain it)."""
    raw_lines = path.read_bytes().splitlines()
    if not raw_lines:
        raise DataError(f"{path}: file is empty")
    header = raw_lines[0].decode("utf-8", errors="replace").lstrip("\ufeff").strip().rsplit(source.separator, 1)
    if len(header) != 2:
        raise DataError(f"{path}: header {raw_lines[0][:80]!r} is not '<text>{source.separator}<label>'")
    text_col, label_col = header
    rows: list[tuple[int, str, str]] = []
    for i, raw in enumerate(raw_lines[1:], start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(skipped_row(source.path, i, "text", "not valid UTF-8", raw.decode("utf-8", "replace")))
            continue
        if not line.strip():
            skipped.append(skipped_row(source.path, i, "text", "blank line"))
            continue
        if source.separator not in line:
            skipped.append(skipped_row(source.path, i, label_col, f"no {source.separator!r} separator", line))
            continue
        text, label = line.rsplit(source.separator, 1)
        rows.append((i, text, label))
    return pd.DataFrame(rows, columns=["row", text_col, label_col])


def _read_delimited(path: Path, source: ClassificationSource, skipped: list[SkippedRow]) -> pd.DataFrame:
    """CSV/TSV with a header; a record with the wrong number of fields is quarantined, not fatal."""
    delimiter = "," if source.format == "csv" else "\t"
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(io.StringIO(_decode(path), newline=""), delimiter=delimiter)
    row = 0
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: file is empty (no header line)")
        records = []
        for row, record in enumerate(reader, start=1):  # noqa: B007 - row is reported if parsing fails
            if not record:
                skipped.append(skipped_row(source.path, row, "row", "blank line"))
            elif len(record) != len(header):
                reason = f"expected {len(header)} fields, got {len(record)}"
                skipped.append(skipped_row(source.path, row, "row", reason, delimiter.join(record)))
            else:
                records.append([row, *record])
    except csv.Error as err:
        raise DataError(f"{path}: row {row + 1}: cannot be parsed as {source.format}: {err}") from None
    return pd.DataFrame(records, columns=["row", *header], dtype=object)


def _read_jsonl(path: Path, source: ClassificationSource, skipped: list[SkippedRow]) -> pd.DataFrame:
    records = []
    for i, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(skipped_row(source.path, i, "row", "not valid UTF-8", raw.decode("utf-8", "replace")))
            continue
        if not line.strip():
            skipped.append(skipped_row(source.path, i, "row", "blank line"))
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            skipped.append(skipped_row(source.path, i, "row", f"not valid JSON ({err})", line))
            continue
        if not isinstance(record, dict):
            skipped.append(skipped_row(source.path, i, "row", f"a JSON {type(record).__name__}, not an object", line))
            continue
        records.append({"row": i, **record})
    columns = {c for r in records for c in r}
    frame = pd.DataFrame(records, columns=["row", *sorted(columns - {"row"})], dtype=object)
    return frame


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot be read as parquet: {err}") from None
    frame = frame.astype(object)
    frame.insert(0, "row", np.arange(1, len(frame) + 1))
    return frame


def read_classification_source(
    source: ClassificationSource,
    root: Path,
    max_text_chars: int = 20_000,
    max_bad_fraction: float = 1.0,
) -> tuple[pd.DataFrame, list[SkippedRow], int]:
    """Read one labelled text file into (row, text, label) and validate every row.

    Returns the valid rows, the skipped rows (file, row, field, reason) and the input row count.
    Fails (DataError naming the file) only when the file as a whole is unusable: missing, empty,
    unparseable, without the configured columns, or with more than ``max_bad_fraction`` of its
    rows malformed (the message then names the first bad rows).
    """
    path = Path(source.path)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DataError(f"{path}: classification data file not found (data.classification '{source.name}')")
    skipped: list[SkippedRow] = []
    readers = {"lastsep": _read_lastsep, "csv": _read_delimited, "tsv": _read_delimited, "jsonl": _read_jsonl}
    frame = _read_parquet(path) if source.format == "parquet" else readers[source.format](path, source, skipped)
    missing = [c for c in (source.text_column, source.label_column) if c not in frame.columns]
    if missing:
        have = [c for c in frame.columns if c != "row"]
        raise DataError(
            f"{path}: missing column(s) {missing} (has {have}); set text_column/label_column "
            f"of data.classification '{source.name}'"
        )
    input_rows = len(frame) + len(skipped)
    if input_rows == 0:
        raise DataError(f"{path}: no data rows")
    frame = frame[["row", source.text_column, source.label_column]].set_axis(["row", "text", "label"], axis=1)
    good = []
    for row, text, label in frame.itertuples(index=False):
        problem, fld = text_problem(text, max_text_chars), "text"
        if not problem:
            problem, fld = label_problem(label), "label"
        if problem:
            skipped.append(skipped_row(source.path, row, fld, problem, text))
        good.append(not problem)
    if len(skipped) > max_bad_fraction * input_rows:
        first = "; ".join(f"row {s.row} ({s.field}: {s.reason})" for s in sorted(skipped, key=lambda s: s.row)[:3])
        raise DataError(
            f"{path}: {len(skipped)} of {input_rows} rows are unusable (more than data.max_bad_fraction "
            f"{max_bad_fraction}); first: {first}"
        )
    frame = frame[np.array(good, dtype=bool)].copy()
    frame["row"] = frame["row"].astype(np.int64)
    frame["text"] = frame["text"].astype(str)
    frame["label"] = frame["label"].map(label_text).astype(str)
    skipped.sort(key=lambda s: s.row)
    return frame.reset_index(drop=True), skipped, input_rows


# ---------------------------------------------------------------- mining


@dataclass
class Mined:
    """The mining step's result: triplets of every classification source plus their accounting."""

    triplets: pd.DataFrame  # OUTPUT_COLUMNS
    reports: list[SourceReport]
    skipped: list[SkippedRow]
    contamination: dict[str, int] = field(default_factory=dict)  # Task/split -> texts removed (or found)
    excluded: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)  # the settings it was mined with
    guide: dict[str, Any] = field(default_factory=dict)  # name and fingerprint of the guide used, if any


def _empty_triplets() -> pd.DataFrame:
    return _schema().empty_table().to_pandas()


def mine_source(
    source: ClassificationSource,
    root: Path,
    settings: DataSettings,
    seed: int,
    guide: GuideEncoder | None = None,
    contamination: ContaminationIndex | None = None,
) -> tuple[pd.DataFrame, SourceReport, list[SkippedRow], Counter[str]]:
    """Read, validate, decontaminate, pool and mine one classification source."""
    mining = settings.mining
    frame, skipped, input_rows = read_classification_source(
        source, root, settings.max_text_chars, settings.max_bad_fraction
    )
    report = SourceReport(name=source.name, kind="classification", file=source.path, input_rows=input_rows)
    for s in skipped:
        report.count("quarantined", s.reason)
    report.labels = int(frame["label"].nunique())
    path = source.path

    single = frame["label"].map(frame["label"].value_counts()) < 2
    for row, text in frame.loc[single, ["row", "text"]].itertuples(index=False):
        skipped.append(skipped_row(path, row, "label", "label has a single example", text))
    report.count("quarantined", "label has a single example", int(single.sum()))
    frame = frame[~single]

    found: Counter[str] = Counter()
    if contamination is not None and settings.contamination.remove:
        # before pooling, so a contaminated text is never a positive or negative either; with
        # remove: false the combine step counts the matching rows instead
        where = frame["text"].map(contamination.match)
        hit = where.notna()
        found.update(where[hit].tolist())
        for row, text, split in zip(frame["row"][hit], frame["text"][hit], where[hit], strict=True):
            reason = f"text in evaluation split {split}"
            skipped.append(skipped_row(path, row, "text", reason, text))
            report.count("decontaminated", reason)
        frame = frame[~hit]

    cap = mining.max_texts_per_task
    if cap is not None and len(frame) > cap:
        rng = np.random.default_rng(_task_seed(seed, f"{source.name}:pool"))
        keep = np.sort(rng.choice(len(frame), size=cap, replace=False))
        report.count("not_sampled", "outside the mining pool (data.mining.max_texts_per_task)", len(frame) - cap)
        frame = frame.iloc[keep]
    alone = frame["label"].map(frame["label"].value_counts()) < 2
    report.count("not_sampled", "no other text of its label in the mining pool", int(alone.sum()))
    frame = frame[~alone].reset_index(drop=True)
    if frame["label"].nunique() < 2:
        raise DataError(
            f"{root / path if not Path(path).is_absolute() else path}: task {source.name}: needs at least two "
            "labels with two or more usable texts each"
        )

    labels = frame["label"].to_numpy(dtype=str)
    texts = frame["text"].to_numpy(dtype=object)
    needs_guide = mining.positive_strategy == "guide_topk"
    if needs_guide and guide is None:
        raise DataError(f"task {source.name}: data.mining.positive_strategy guide_topk needs the guide model")
    wants_embeddings = guide is not None and (needs_guide or settings.audit.guide_verdicts)
    embeddings = guide.embed(list(texts)) if wants_embeddings else None
    positives_rng = np.random.default_rng(_task_seed(seed, f"{source.name}:positives"))
    if needs_guide:
        assert embeddings is not None
        text_ids = pd.factorize(frame["text"])[0]  # identical texts are never each other's positive
        positive = guided_positives(embeddings, labels, text_ids, mining.top_k, mining.temperature, positives_rng)
    else:
        positive = same_label_partner(labels, positives_rng)
    negative = other_label_partner(labels, np.random.default_rng(_task_seed(seed, f"{source.name}:negatives")))
    anchor_idx = np.arange(len(frame))
    if embeddings is not None:
        baseline = same_label_partner(labels, np.random.default_rng(_task_seed(seed, f"{source.name}:baseline")))
        sims = row_similarity(embeddings, anchor_idx, baseline)
        report.guide_random_same_label_sim_mean = round(float(np.nanmean(sims)), 4)
        pos_sim = row_similarity(embeddings, anchor_idx, positive)
        neg_sim = row_similarity(embeddings, anchor_idx, negative)
    else:
        pos_sim = neg_sim = np.full(len(frame), np.nan, dtype=np.float32)

    no_positive = positive < 0
    for row, text in frame.loc[no_positive, ["row", "text"]].itertuples(index=False):
        skipped.append(skipped_row(path, row, "positive", "no same-label text other than copies of itself", text))
    report.count("degenerate", "no same-label text other than copies of itself", int(no_positive.sum()))
    ok = ~no_positive
    triplets = pd.DataFrame(
        {
            "anchor": texts[ok],
            "positive": texts[positive[ok]],
            "negative": texts[negative[ok]],
            "task_name": source.name,
            "source": source.name,
            "source_row": frame["row"].to_numpy()[ok],
            "anchor_label": labels[ok],
            "positive_label": labels[positive[ok]],
            "negative_label": labels[negative[ok]],
            "guide_pos_sim": pos_sim[ok],
            "guide_neg_sim": neg_sim[ok],
        }
    )
    degenerate = (triplets["anchor"] == triplets["positive"]) | (triplets["anchor"] == triplets["negative"])
    for row, text in triplets.loc[degenerate, ["source_row", "anchor"]].itertuples(index=False):
        skipped.append(skipped_row(path, row, "positive", "anchor equals its positive or negative", text))
    report.count("degenerate", "anchor equals its positive or negative", int(degenerate.sum()))
    triplets = triplets[~degenerate].reset_index(drop=True)
    log.info("%s: mined %d triplets from %d rows (pool %d)", source.name, len(triplets), input_rows, len(frame))
    return triplets, report, skipped, found


def mine_all(
    settings: DataSettings,
    root: Path,
    seed: int,
    guide: GuideEncoder | None = None,
    contamination: ContaminationIndex | None = None,
) -> Mined:
    """Mine every configured classification source that is not in ``mining.exclude``."""
    frames, reports, skipped, excluded = [], [], [], []
    found: Counter[str] = Counter()
    for source in settings.classification:
        if settings.is_excluded(source.name):
            log.info("%s: excluded from mining (data.mining.exclude)", source.name)
            excluded.append(source.name)
            continue
        triplets, report, source_skipped, source_found = mine_source(source, root, settings, seed, guide, contamination)
        frames.append(triplets)
        reports.append(report)
        skipped.extend(source_skipped)
        found.update(source_found)
    if not frames and settings.medi is None:
        raise DataError(f"every data.classification source is in data.mining.exclude ({excluded}) and no data.medi")
    triplets = pd.concat(frames, ignore_index=True) if frames else _empty_triplets()
    return Mined(triplets[OUTPUT_COLUMNS], reports, skipped, dict(sorted(found.items())), excluded)


def write_mined(mined: Mined, folder: Path) -> None:
    """Write the mining step's output folder (deterministic bytes: no timings, no absolute paths)."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(_table(mined.triplets), folder / MINED_TRIPLETS)
    _write_skipped(mined.skipped, folder / MINED_SKIPPED)
    payload = {
        "sources": [asdict(r) for r in mined.reports],
        "contamination": mined.contamination,
        "excluded": mined.excluded,
        "params": mined.params,
        "guide": mined.guide,
    }
    (folder / MINED_REPORT).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_mined(folder: Path) -> Mined:
    files = [folder / name for name in (MINED_TRIPLETS, MINED_SKIPPED, MINED_REPORT)]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise DataError(f"{folder}: no mined triplets ({', '.join(missing)} missing); run `gist data` first")
    payload = json.loads((folder / MINED_REPORT).read_text())
    skipped_frame = pd.read_csv(folder / MINED_SKIPPED, dtype=str, keep_default_na=False)
    skipped = [SkippedRow(r.file, int(r.row), r.field, r.reason, r.text) for r in skipped_frame.itertuples()]
    return Mined(
        triplets=pd.read_parquet(folder / MINED_TRIPLETS)[OUTPUT_COLUMNS],
        reports=[SourceReport.from_dict(r) for r in payload["sources"]],
        skipped=skipped,
        contamination=payload.get("contamination") or {},
        excluded=payload.get("excluded") or [],
        params=payload.get("params") or {},
        guide=payload.get("guide") or {},
    )


# ---------------------------------------------------------------- combining and auditing


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
                rng = np.random.default_rng(_task_seed(seed, f"{task}:cap"))
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
    medi = _load_medi(settings, root)
    return combine(mined, medi, settings, seed, guide, contamination)


def _load_medi(settings: DataSettings, root: Path) -> MediData | None:
    if settings.medi is None:
        return None
    from gist_core.medi import load_medi

    return load_medi(settings.medi, root, settings.max_text_chars, settings.max_bad_fraction)


# ---------------------------------------------------------------- the two stages


def contamination_tasks(settings: Settings) -> tuple[list[str], bool]:
    """(tasks to check, whether tasks without a local copy are skipped).

    ``data.contamination.tasks`` when set; otherwise ``evaluate.tasks`` plus every mined source that
    is itself a local evaluation task (its own test splits), so the data stays clean when such a
    task is evaluated later.
    """
    from gist_core.tasks import LOCAL_TASKS

    configured = settings.data.contamination.tasks
    if configured is not None:
        return list(configured), False
    tasks = list(settings.evaluate.tasks)
    for source in settings.data.classification:
        if source.name in LOCAL_TASKS and source.name not in tasks and not settings.data.is_excluded(source.name):
            tasks.append(source.name)
    return tasks, True


def mine_params(settings: Settings) -> dict[str, Any]:
    """The settings the mined triplets depend on (the DVC ``mine`` stage's params, resolved)."""
    data = settings.data.model_dump(mode="json")
    mining = {k: v for k, v in data["mining"].items() if k not in ("cache_dir", "batch_size")}
    return {
        "seed": settings.base.seed,
        "guide": settings.base.guide,
        "classification": data["classification"],
        "mining": mining,
        "contamination": {"tasks": contamination_tasks(settings)[0], "remove": data["contamination"]["remove"]},
        "guide_verdicts": data["audit"]["guide_verdicts"],
        "max_text_chars": data["max_text_chars"],
        "max_bad_fraction": data["max_bad_fraction"],
        "eval_data_dir": settings.evaluate.data_dir,
    }


def _contamination_index(settings: Settings) -> ContaminationIndex:
    tasks, local_only = contamination_tasks(settings)
    return build_contamination_index(tasks, settings.path(settings.evaluate.data_dir), local_only=local_only)


def mine_stage(settings: Settings) -> Mined:
    """The DVC ``mine`` stage: mine every classification source and write ``data.mined``."""
    from gist_core.mining import load_guide

    cfg = settings.data
    needs_guide = bool(cfg.classification) and (
        cfg.mining.positive_strategy == "guide_topk" or cfg.audit.guide_verdicts
    )
    guide = load_guide(settings) if needs_guide else None
    mined = mine_all(cfg, settings.root, settings.base.seed, guide, _contamination_index(settings))
    mined.params = mine_params(settings)
    mined.guide = {"name": guide.name, "fingerprint": guide.fingerprint} if guide is not None else {}
    write_mined(mined, settings.path(cfg.mined))
    if guide is not None:
        log.info("guide %s: %s", guide.name, guide.describe())
    return mined


def combine_stage(settings: Settings) -> DataReport:
    """The DVC ``data`` stage: combine the mined triplets with MEDI, audit, and write every output."""
    cfg = settings.data
    mined = read_mined(settings.path(cfg.mined))
    expected = mine_params(settings)
    if mined.params != expected:
        changed = sorted(k for k in expected if mined.params.get(k) != expected[k])
        raise DataError(
            f"{settings.path(cfg.mined)} was mined with other settings ({', '.join(changed)}); "
            "run `gist data` (both steps) or `dvc repro data`"
        )
    medi = _load_medi(cfg, settings.root)
    guide = None
    if cfg.audit.guide_verdicts and medi is not None:
        from gist_core.mining import load_guide

        guide = load_guide(settings)
    data, report, skipped = combine(mined, medi, cfg, settings.base.seed, guide, _contamination_index(settings))
    report.settings = {
        "seed": settings.base.seed,
        "positive_strategy": cfg.mining.positive_strategy,
        "top_k": cfg.mining.top_k,
        "temperature": cfg.mining.temperature,
        "max_texts_per_task": cfg.mining.max_texts_per_task,
        "exclude": ", ".join(cfg.mining.exclude) or "none",
        "excluded sources": ", ".join(mined.excluded) or "none",
        "max_per_task": cfg.max_per_task,
        "medi": cfg.medi.path if cfg.medi is not None else "none",
        "keep_instructions": cfg.medi.keep_instructions if cfg.medi is not None else "-",
    }
    write_outputs(
        data,
        report,
        skipped,
        settings.path(cfg.output),
        settings.path(cfg.report),
        settings.path(cfg.quarantine),
        settings.path(cfg.report_markdown),
    )
    return report


# ---------------------------------------------------------------- writing and reading


def _write_skipped(skipped: list[SkippedRow], path: Path) -> None:
    frame = pd.DataFrame([asdict(s) for s in skipped], columns=QUARANTINE_COLUMNS)
    frame.to_csv(path, index=False, lineterminator="\n")


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
    import pyarrow.parquet as pq

    for path in (output, report_path, quarantine, *([markdown] if markdown else [])):
        path.parent.mkdir(parents=True, exist_ok=True)
    frame = data.copy()
    for column in OUTPUT_COLUMNS:
        if column not in frame.columns:  # triplets built elsewhere: fill the optional columns
            frame[column] = np.float32(np.nan) if column.startswith("guide_") else None
    if frame["source_row"].isna().any():
        frame["source_row"] = frame["source_row"].fillna(0)
    tmp = output.with_suffix(output.suffix + ".tmp")
    pq.write_table(_table(frame), tmp)
    tmp.replace(output)
    report_path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    _write_skipped(skipped, quarantine)
    if markdown is not None:
        markdown.write_text(report.to_markdown())


def load_triplets(path: Path) -> pd.DataFrame:
    """Read the prepared triplets, checking the columns training relies on."""
    if not path.is_file():
        raise DataError(f"{path}: prepared triplets not found; run `gist data` (or `dvc repro data`) first")
    frame = pd.read_parquet(path)
    missing = [c for c in TRIPLET_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    if frame.empty:
        raise DataError(f"{path}: no triplets")
    return frame
