"""Classification train splits (``data.classification``): read and checked row by row into (row, text, label)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from gist_core.config import ClassificationSource
from gist_core.errors import DataError
from gist_core.readers import SkippedRow, read_labelled


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
    where = f"data.classification '{source.name}'"
    if not path.is_file():
        raise DataError(f"{path}: classification data file not found ({where})")
    return read_labelled(
        path,
        source.format,
        source.text_column,
        source.label_column,
        separator=source.separator,
        label=source.path,
        max_text_chars=max_text_chars,
        max_bad_fraction=max_bad_fraction,
        where=where,
    )
