"""The DVC ``mine`` stage's work: each classification source read, decontaminated, pooled and mined.

For every text of a source's (capped) pool the guide proposes a positive among the same-label
texts it finds most similar (``gist_core.data.mining``) and a random text of another label is the
negative. The output folder ``data.mined`` holds the triplets, the skipped rows and the row
accounting, in deterministic bytes.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from gist_core.config import ClassificationSource, DataSettings, Settings
from gist_core.data.audit import SourceReport
from gist_core.data.classification import read_classification_source
from gist_core.data.contamination import ContaminationIndex, contamination_tasks, normalize_texts
from gist_core.data.guide_encoder import TextEmbedder
from gist_core.data.medi import EXACT_DEGENERATE, NEAR_DEGENERATE
from gist_core.data.mining import guided_positives, other_label_partner, row_similarity, same_label_partner
from gist_core.data.schema import OUTPUT_COLUMNS, empty_triplets, triplet_table
from gist_core.errors import DataError
from gist_core.hashing import seed_for
from gist_core.readers import SkippedRow, read_skipped, skipped_row, write_skipped

log = logging.getLogger(__name__)

MINED_TRIPLETS = "triplets.parquet"
MINED_SKIPPED = "skipped.csv"
MINED_REPORT = "report.json"


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


def mine_source(
    source: ClassificationSource,
    root: Path,
    settings: DataSettings,
    seed: int,
    guide: TextEmbedder | None = None,
    contamination: ContaminationIndex | None = None,
) -> tuple[pd.DataFrame, SourceReport, list[SkippedRow], Counter[str]]:
    """Read, validate, decontaminate, pool and mine one classification source."""
    pool = mining_pool(source, root, settings, seed, contamination)
    return _mine_pool(source, settings, seed, pool, guide)


@dataclass
class Pool:
    """A source's mining pool: the texts the guide embeds and mining draws from, with their accounting."""

    frame: pd.DataFrame  # row, text, label
    report: SourceReport
    skipped: list[SkippedRow]
    found: Counter[str]
    input_rows: int


def mining_pool(
    source: ClassificationSource,
    root: Path,
    settings: DataSettings,
    seed: int,
    contamination: ContaminationIndex | None = None,
) -> Pool:
    """Read, validate and decontaminate a source and draw its (capped, seeded) pool: the ``embed`` stage embeds it."""
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
        where = pd.Series(contamination.match_column(frame["text"]), index=frame.index, dtype=object)
        hit = where.notna()
        found.update(where[hit].tolist())
        for row, text, split in zip(frame["row"][hit], frame["text"][hit], where[hit], strict=True):
            reason = f"text in evaluation split {split}"
            skipped.append(skipped_row(path, row, "text", reason, text))
            report.count("decontaminated", reason)
        frame = frame[~hit]

    cap = mining.max_texts_per_task
    if cap is not None and len(frame) > cap:
        rng = np.random.default_rng(seed_for(seed, f"{source.name}:pool"))
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
    return Pool(frame, report, skipped, found, input_rows)


def _mine_pool(
    source: ClassificationSource, settings: DataSettings, seed: int, pool: Pool, guide: TextEmbedder | None
) -> tuple[pd.DataFrame, SourceReport, list[SkippedRow], Counter[str]]:
    mining = settings.mining
    frame, report, skipped, found, input_rows = pool.frame, pool.report, pool.skipped, pool.found, pool.input_rows
    path = source.path
    labels = frame["label"].to_numpy(dtype=str)
    texts = frame["text"].to_numpy(dtype=object)
    needs_guide = mining.positive_strategy == "guide_topk"
    if needs_guide and guide is None:
        raise DataError(f"task {source.name}: data.mining.positive_strategy guide_topk needs the guide model")
    wants_embeddings = guide is not None and (needs_guide or settings.audit.guide_verdicts)
    embeddings = guide.embed(list(texts), pass_name="mining") if wants_embeddings else None
    positives_rng = np.random.default_rng(seed_for(seed, f"{source.name}:positives"))
    # a text and its near-duplicates (equal after case and whitespace normalisation) are never each other's positive
    text_ids = pd.factorize(np.asarray(normalize_texts(frame["text"]).to_pylist(), dtype=object))[0]
    if needs_guide:
        assert embeddings is not None
        positive = guided_positives(embeddings, labels, text_ids, mining.top_k, mining.temperature, positives_rng)
    else:
        positive = same_label_partner(labels, positives_rng)
    negative = other_label_partner(labels, np.random.default_rng(seed_for(seed, f"{source.name}:negatives")))
    anchor_idx = np.arange(len(frame))
    if embeddings is not None:
        baseline = same_label_partner(labels, np.random.default_rng(seed_for(seed, f"{source.name}:baseline")))
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
    anchor_ids = text_ids[ok]
    near = (anchor_ids == text_ids[positive[ok]]) | (anchor_ids == text_ids[negative[ok]])
    exact = ((triplets["anchor"] == triplets["positive"]) | (triplets["anchor"] == triplets["negative"])).to_numpy()
    for row, text, same in (
        triplets.loc[near, ["source_row", "anchor"]].assign(same=exact[near]).itertuples(index=False)
    ):
        reason = EXACT_DEGENERATE if same else NEAR_DEGENERATE
        skipped.append(skipped_row(path, row, "positive", reason, text))
        report.count("degenerate", reason)
    triplets = triplets[~near].reset_index(drop=True)
    log.info("%s: mined %d triplets from %d rows (pool %d)", source.name, len(triplets), input_rows, len(frame))
    return triplets, report, skipped, found


def mine_all(
    settings: DataSettings,
    root: Path,
    seed: int,
    guide: TextEmbedder | None = None,
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
    triplets = pd.concat(frames, ignore_index=True) if frames else empty_triplets()
    return Mined(triplets[OUTPUT_COLUMNS], reports, skipped, dict(sorted(found.items())), excluded)


def write_mined(mined: Mined, folder: Path) -> None:
    """Write the mining step's output folder (deterministic bytes: no timings, no absolute paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(triplet_table(mined.triplets), folder / MINED_TRIPLETS)
    write_skipped(mined.skipped, folder / MINED_SKIPPED)
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
    skipped = read_skipped(folder / MINED_SKIPPED)
    return Mined(
        triplets=pd.read_parquet(folder / MINED_TRIPLETS)[OUTPUT_COLUMNS],
        reports=[SourceReport.from_dict(r) for r in payload["sources"]],
        skipped=skipped,
        contamination=payload.get("contamination") or {},
        excluded=payload.get("excluded") or [],
        params=payload.get("params") or {},
        guide=payload.get("guide") or {},
    )


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
