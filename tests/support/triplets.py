"""Triplets for the training tests, built straight from the shipped raw data.

Training's only contract with the data stage is ``triplets.parquet`` with the columns anchor,
positive, negative and task_name (extra columns ignored), so the training tests build such a file
themselves instead of running the data pipeline: anchor and positive share a label, the negative
has another one, all seeded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

RAW = Path("data/raw/classification")
TASKS = ("Banking77Classification", "EmotionClassification", "TweetSentimentExtractionClassification")


def _labelled_texts(repo_root: Path) -> dict[str, pd.DataFrame]:
    raw = repo_root / RAW
    banking = pd.read_csv(raw / "banking77/train.csv").rename(columns={"category": "label"})
    lines = (raw / "emotion/train.txt").read_text(encoding="utf-8").splitlines()[1:]
    emotion = pd.DataFrame([line.rsplit(";", 1) for line in lines if ";" in line], columns=["text", "label"])
    tweets = pd.read_csv(raw / "tweet_sentiment_extraction/train.csv").rename(columns={"sentiment": "label"})
    out = {}
    for task, frame in zip(TASKS, (banking, emotion, tweets), strict=True):
        frame = frame[["text", "label"]].dropna()
        frame = frame.assign(text=frame["text"].astype(str).str.strip())
        out[task] = frame[frame["text"].str.len() > 0].drop_duplicates("text")
    return out


def sample_triplets(repo_root: Path, per_task: int = 40, seed: int = 0) -> pd.DataFrame:
    """``per_task`` (anchor, positive, negative, task_name) rows per task, three distinct texts each."""
    rng = np.random.default_rng(seed)
    rows = []
    for task, frame in _labelled_texts(repo_root).items():
        by_label = {label: group["text"].tolist() for label, group in frame.groupby("label")}
        pairable = sorted(label for label, texts in by_label.items() if len(texts) >= 2)
        for _ in range(per_task):
            label = pairable[rng.integers(len(pairable))]
            anchor, positive = rng.choice(by_label[label], size=2, replace=False)
            other = sorted(set(by_label) - {label})
            negatives = by_label[other[rng.integers(len(other))]]
            rows.append((str(anchor), str(positive), str(negatives[rng.integers(len(negatives))]), task))
    return pd.DataFrame(rows, columns=["anchor", "positive", "negative", "task_name"])


def write_triplets(repo_root: Path, path: Path, per_task: int = 40, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = sample_triplets(repo_root, per_task, seed)
    frame["source_row"] = range(len(frame))  # an extra column, as the data stage may add: training ignores it
    frame.to_parquet(path, index=False)
    return path
