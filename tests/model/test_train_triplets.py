"""The sampled triplets the training tests use meet the training contract."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tests.support.triplets import TASKS, sample_triplets, write_triplets


def test_sampled_triplets_meet_the_training_contract(repo_root: Path, tmp_path: Path) -> None:
    frame = pd.read_parquet(write_triplets(repo_root, tmp_path / "t.parquet", per_task=10, seed=1))
    assert list(frame.columns[:4]) == ["anchor", "positive", "negative", "task_name"]
    assert frame.groupby("task_name").size().to_dict() == dict.fromkeys(TASKS, 10)
    assert (frame["anchor"] != frame["positive"]).all() and (frame["anchor"] != frame["negative"]).all()
    again = sample_triplets(repo_root, per_task=10, seed=1)
    assert again.equals(frame.drop(columns="source_row"))
