"""The model card's text from known values (no MLflow, no mteb results: the recorded-scores path)."""

from __future__ import annotations

import yaml

from gist_core.config import GateSettings
from gist_core.gate import Scorecard, decide
from gist_core.registry.card import SECTIONS, THIS, CardInputs, render
from gist_core.registry.history import ChampionEvent, effective_events

TRAIN = {
    "loss": "gist",
    "temperature": 0.01,
    "margin_strategy": "absolute",
    "margin": 0.0,
    "contrast_anchors": True,
    "contrast_positives": False,
    "max_steps": 30,
    "num_train_epochs": None,
    "warmup_ratio": 0.1,
    "learning_rate": 2e-05,
    "batch_size": 32,
    "max_seq_length": 64,
    "batch_sampler": "no_duplicates",
    "task_homogeneous_batches": True,
    "mini_batch_size": None,
}
CANDIDATE = {"STSBenchmark": 0.8224, "Banking77Classification": 0.8046}
BASE = {"STSBenchmark": 0.8203, "Banking77Classification": 0.8004}
CHAMPION = {"STSBenchmark": 0.8210, "Banking77Classification": 0.8031}


def inputs() -> CardInputs:
    decision = decide(
        Scorecard("candidate", CANDIDATE),
        Scorecard("champion", CHAMPION, version="1"),
        GateSettings(required_tasks=["STSBenchmark"]),
        categories={"STSBenchmark": "STS", "Banking77Classification": "Classification"},
    )
    return CardInputs(
        name="gist-embedding",
        version="2",
        aliases=("challenger", "champion"),
        student="all-MiniLM-L6-v2",
        student_id="sentence-transformers/all-MiniLM-L6-v2",
        student_fingerprint="a" * 64,
        guide="all-mpnet-base-v2",
        guide_fingerprint="b" * 64,
        train=TRAIN,
        trained={"steps": 30, "train_loss": 1.2345, "guide": "cache", "world_size": 1},
        seed=42,
        data_version="9a41" + "0" * 28,
        data_path="data/prepared/triplets.parquet",
        sources=[("Banking77Classification", "data/raw/classification/banking77/train.csv")],
        triplets_per_task={"Banking77Classification": 2000, "EmotionClassification": 1999},
        decision=decision,
        run_id="r" * 32,
        tracking_uri="sqlite:////tmp/mlflow.db",
        git_commit="c" * 40,
        params_hash="p" * 64,
        weights_hash="w" * 64,
        mteb_version="2.26.24",
        eval_settings={"precision": "float32", "max_seq_length": "model", "libraries": "torch==2.13.0"},
        task_revisions={"STSBenchmark": "5f160b2f30098cb0", "Banking77Classification": "0123456789abcdef"},
        categories={"STSBenchmark": "STS", "Banking77Classification": "Classification"},
        recorded={THIS: CANDIDATE, "base": BASE, "champion v1": CHAMPION},
        train_key="k" * 16,
        guide_id="sentence-transformers/all-mpnet-base-v2",
    )


def test_card_sections_in_order_with_the_values_given() -> None:
    text = render(inputs())
    front, body = text.split("---\n", 2)[1:]
    body = body.lstrip("\n")
    meta = yaml.safe_load(front)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["library_name"] == "sentence-transformers" and "mteb" in meta["tags"]
    positions = [body.index(f"\n## {section}\n") for section in SECTIONS]
    assert positions == sorted(positions)
    assert body.startswith("# gist-embedding version 2\n")
    for row in (
        "| guide (frozen) | `all-mpnet-base-v2` | sentence-transformers/all-mpnet-base-v2 | `" + "b" * 64 + "` |",
        "| temperature | 0.01 |",
        "| contrast positives (positive-positive negatives) | False |",
        "| epochs or steps | 30 steps |",
        "| checkpoint step | 30 |",
        "| learning rate | 2e-05 |",
        "| warmup ratio | 0.1 |",
        "| batch size (per device) | 32 |",
        "| EmotionClassification | 1999 |",
        "| STSBenchmark | STS | 0.8224 | 0.8203 | 0.8210 | +0.0021 | +0.0014 |",
        "| Banking77Classification | Classification | 0.8046 | 0.8004 | 0.8031 | +0.0042 | +0.0015 |",
    ):
        assert row in body, row
    assert "| task | type | this version | base | champion v1 | Δ base | Δ champion v1 |" in body
    assert "3,999 triplets" in body and "`9a41" in body
    assert "gate passed (mode enabled, baseline champion v1)" in body
    assert 'load_model("models:/gist-embedding@champion")' in body and "SentenceTransformer(" in body
    assert "precision float32" in body and "Lineage" in body and "w" * 64 in body
    assert "@article{solatorio2024gistembed" in body


def _event(version, previous, state, t):
    return ChampionEvent(f"2026-01-0{t}T00:00:00Z", "promote", version, previous, state=state, key=f"k{t}")


def test_an_intended_event_counts_only_if_its_move_happened() -> None:
    done1, intended2 = _event("1", None, "done", 1), _event("2", "1", "intended", 2)
    assert effective_events([done1, intended2], champion="2") == [done1, intended2]  # alias moved: it happened
    assert effective_events([done1, intended2], champion="1") == [done1]  # it never moved
    later = _event("3", "2", "done", 3)  # moved on from 2: so 2 had been champion
    assert effective_events([done1, intended2, later], champion="3") == [done1, intended2, later]
    abandoned = _event("2", "1", "abandoned", 2)
    assert effective_events([done1, abandoned], champion="1") == [done1]
