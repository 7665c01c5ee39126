"""The training triplets file (``data.output``): its columns, how it is written, how training reads it.

The contract is ``anchor, positive, negative, task_name``; the data stage adds ``source``,
``source_row``, the three texts' labels (classification rows) and the guide's similarities.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gist_core.errors import DataError

TRIPLET_COLUMNS = ["anchor", "positive", "negative", "task_name"]
TEXT_COLUMNS = ("anchor", "positive", "negative")
LABEL_COLUMNS = {"anchor": "anchor_label", "positive": "positive_label", "negative": "negative_label"}
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


def schema() -> pa.Schema:
    text = [pa.field(c, pa.string()) for c in (*TRIPLET_COLUMNS, "source")]
    labels = [pa.field(c, pa.string()) for c in LABEL_COLUMNS.values()]
    sims = [pa.field(c, pa.float32()) for c in ("guide_pos_sim", "guide_neg_sim")]
    return pa.schema([*text, pa.field("source_row", pa.int64()), *labels, *sims])


def triplet_table(frame: pd.DataFrame) -> pa.Table:
    """The output columns as an Arrow table without pandas metadata: the bytes depend only on the values."""
    table = pa.Table.from_pandas(frame[OUTPUT_COLUMNS], schema=schema(), preserve_index=False)
    return table.replace_schema_metadata(None)


def empty_triplets() -> pd.DataFrame:
    return schema().empty_table().to_pandas()


def load_triplets_schema(path: Path) -> pa.Schema:
    """The prepared triplets' schema (no rows read), checking the columns training relies on."""
    if not path.is_file():
        raise DataError(f"{path}: prepared triplets not found; run `gist data` (or `dvc repro data`) first")
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot be read as Parquet: {err}") from None
    missing = [c for c in TRIPLET_COLUMNS if c not in parquet.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}")
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{path}: no triplets")
    return parquet.schema_arrow


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
