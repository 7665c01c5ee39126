"""Small custom evaluation tasks in every format the docs describe, written into a folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

INTENTS = {"card": ["my card is lost", "card stolen", "block my card"], "pin": ["reset pin", "forgot my pin", "pin?"]}


def write_files(root: Path) -> None:
    """One small data set per format the README documents."""
    (root / "intents").mkdir(parents=True)
    train = [(f"{text} please {i}", label) for i in range(4) for label, texts in INTENTS.items() for text in texts]
    lines = ["utterance\tintent"] + [f"{t}\t{label}" for t, label in train]
    (root / "intents/train.tsv").write_text("\n".join(lines) + "\n")
    (root / "intents/test.tsv").write_text(
        "utterance\tintent\n" + "".join(f"{t} now\t{label}\n" for label, texts in INTENTS.items() for t in texts)
    )
    pairs = [("a man plays guitar", "a person plays an instrument", 4.2), ("a cat sleeps", "stocks fell", 0.1)]
    pairs += [(f"sentence {i}", f"sentence {i + 1}", float(i % 5)) for i in range(10)]
    (root / "sts.jsonl").write_text(
        "".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in pairs)
    )
    (root / "ret").mkdir()
    docs = [{"_id": f"d{i}", "title": f"Doc {i}", "text": f"about topic {i} and more"} for i in range(30)]
    (root / "ret/corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": f"q{i}", "text": f"what about topic {i}?"} for i in range(8)]
    (root / "ret/queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "ret/qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(8)))


CUSTOM_TASKS: list[dict[str, Any]] = [
    {
        "name": "MyIntentClassification",
        "type": "Classification",
        "train": "intents/train.tsv",
        "test": "intents/test.tsv",
        "format": "tsv",
        "text_column": "utterance",
        "label_column": "intent",
        "samples_per_label": 4,
        "n_experiments": 3,
    },
    {"name": "MySTS", "type": "STS", "test": "sts.jsonl", "license": "cc-by-4.0", "citation": "@misc{mine}"},
    {
        "name": "MyRetrieval",
        "type": "Retrieval",
        "corpus": "ret/corpus.jsonl",
        "queries": "ret/queries.jsonl",
        "qrels": "ret/qrels.tsv",
    },
]
NAMES = [t["name"] for t in CUSTOM_TASKS]
