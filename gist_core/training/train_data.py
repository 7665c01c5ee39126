"""The training data as the trainer reads it: the triplets by task, memory-mapped, and each text's label.

``build_train_dataset`` gives one ``datasets.Dataset`` per ``task_name`` (or one for all), each a
contiguous slice of an Arrow file sorted by task: written once per data version, memory-mapped, so
nothing is copied and processes on one host share its pages. The file is written a group of tasks
at a time, so building it holds at most ``SORT_ROWS_PER_PASS`` rows in memory whatever the data's size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gist_core.data.schema import LABEL_COLUMNS, load_triplets, load_triplets_schema
from gist_core.hashing import file_md5

TRAIN_COLUMNS = ["anchor", "positive", "negative"]
TRAIN_ARROW_DIR = ".cache/train-datasets"  # the triplets as task-sorted Arrow files, memory-mapped by training
SORT_ROWS_PER_PASS = 262_144  # rows of the triplets held at once while writing the task-sorted file
READ_ROWS = 65_536


def task_groups(tasks: pa.ChunkedArray, rows_per_pass: int) -> list[list[str]]:
    """The task names in order, grouped so that each group's rows stay within ``rows_per_pass``
    (a task larger than that is a group of its own)."""
    counts = pc.value_counts(tasks)
    names = counts.field("values").to_pylist()
    sizes = counts.field("counts").to_pylist()
    groups: list[list[str]] = []
    held = 0
    for i in pc.sort_indices(counts.field("values")).to_pylist():  # the order the file is sorted in
        if not groups or held + sizes[i] > rows_per_pass:
            groups.append([])
            held = 0
        groups[-1].append(names[i])
        held += sizes[i]
    return groups


def _row_groups_with(parquet: pq.ParquetFile, first: str, last: str) -> list[int]:
    """The row groups whose task names may fall in ``[first, last]`` (by their min/max statistics; all
    of them where a file has none). Data written task by task, as MEDI is, skips most row groups."""
    column = parquet.schema_arrow.get_field_index("task_name")
    keep = []
    for i in range(parquet.metadata.num_row_groups):
        stats = parquet.metadata.row_group(i).column(column).statistics
        if stats is not None and stats.has_min_max and (stats.max < first or stats.min > last):
            continue
        keep.append(i)
    return keep


def task_sorted_arrow(
    triplets_path: Path, folder: Path, rows_per_pass: int = SORT_ROWS_PER_PASS, data_md5: str | None = None
) -> Path:
    """The training columns sorted by task (stable: file order within a task) as an Arrow file, for memory-mapping.

    Written once per data version, one group of tasks per pass over the Parquet file (each pass
    keeps only its group's rows), so memory stays bounded at any data size. ``data_md5``: the
    triplets' md5 when the caller has it already (the file is named after it).
    """
    target = folder / f"{data_md5 or file_md5(triplets_path)}.arrow"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    columns = ["task_name", *TRAIN_COLUMNS]
    parquet = pq.ParquetFile(triplets_path)
    schema = pa.schema([parquet.schema_arrow.field(c) for c in columns])
    groups = task_groups(pq.read_table(triplets_path, columns=["task_name"])["task_name"], rows_per_pass)
    tmp = folder / f".{target.name}.{os.getpid()}.tmp"
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for group in groups:
            wanted = pa.array(group, type=schema.field("task_name").type)
            row_groups = _row_groups_with(parquet, group[0], group[-1])
            parts = [
                batch.filter(pc.is_in(batch.column("task_name"), value_set=wanted))
                for batch in parquet.iter_batches(batch_size=READ_ROWS, columns=columns, row_groups=row_groups)
            ]
            table = pa.Table.from_batches([p for p in parts if p.num_rows], schema=schema)
            order = pc.sort_indices(table, sort_keys=[("task_name", "ascending")])  # stable
            for begin in range(0, len(order), READ_ROWS):
                writer.write_table(table.take(order.slice(begin, READ_ROWS)))
            del parts, table
    pa.default_memory_pool().release_unused()
    tmp.replace(target)
    return target


def build_train_dataset(
    triplets_path: Path, task_homogeneous: bool, arrow_dir: Path | None = None, data_md5: str | None = None
) -> Any:
    """A Dataset of (anchor, positive, negative), or a DatasetDict with one dataset per task.

    With ``arrow_dir`` the rows are memory-mapped from an Arrow file sorted by task (each task a
    contiguous slice, nothing copied): start-up costs one pass over the file per data version, and
    processes on one host share the pages. Without it they are read into memory.
    """
    # deferred: datasets takes a second to import
    from datasets import Dataset, DatasetDict

    if arrow_dir is None:
        frame = load_triplets(triplets_path)
        if not task_homogeneous:
            return Dataset.from_pandas(frame[TRAIN_COLUMNS], preserve_index=False)
        return DatasetDict(
            {
                str(task): Dataset.from_pandas(group[TRAIN_COLUMNS], preserve_index=False)
                for task, group in frame.groupby("task_name", sort=True)
            }
        )
    load_triplets_schema(triplets_path)
    data = Dataset.from_file(str(task_sorted_arrow(triplets_path, arrow_dir, data_md5=data_md5)))
    tasks = data.data.column("task_name")
    data = data.remove_columns("task_name")
    if not task_homogeneous:
        return data
    names, starts = _runs(tasks)
    bounds = [*starts, len(data)]
    return DatasetDict({name: data.select(range(bounds[i], bounds[i + 1])) for i, name in enumerate(names)})


def _runs(column: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    """The values of a sorted column and where each run of equal values starts."""
    values = column.to_numpy(zero_copy_only=False).astype(object)
    if not len(values):
        return [], []
    starts = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))
    return [str(values[i]) for i in starts], [int(i) for i in starts]


def text_labels(triplets_path: Path) -> dict[str, str]:
    """Each text's label, from the triplets' label columns (task-qualified, so labels of two tasks never match).

    Texts seen with two different labels are left out (their label is unknown); rows without
    labels (e.g. MEDI) add nothing. Empty when the file has no label columns. The filter runs in
    the Parquet scan, a batch at a time: unlabelled rows' texts are never held (a million MEDI rows
    cost a few MB, not the text columns).
    """
    names = set(pq.read_schema(triplets_path).names)
    pairs = []
    for text_column, label_column in LABEL_COLUMNS.items():
        if label_column not in names:
            continue
        labelled = pc.field(label_column).cast(pa.string()) != ""  # null labels drop out too
        table = pq.read_table(triplets_path, columns=["task_name", text_column, label_column], filters=labelled)
        part = table.to_pandas()
        qualified = part["task_name"].astype(str) + ":" + part[label_column].astype(str)
        pairs.append(pd.DataFrame({"text": part[text_column].astype(str), "label": qualified}))
    if not pairs:
        return {}
    labelled = pd.concat(pairs, ignore_index=True).drop_duplicates()
    clear = labelled[~labelled["text"].duplicated(keep=False)]  # a text with two labels: unknown
    return dict(zip(clear["text"], clear["label"], strict=True))
