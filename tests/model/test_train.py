"""Training behaviour on a tiny random BERT (plumbing) and the real MiniLM (a guided step moves it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gist_core.config import settings_from_dict
from gist_core.errors import ModelError
from gist_core.training.train_data import build_train_dataset
from gist_core.training.trainer import TRAIN_METRICS_FILE, train
from tests.support.triplets import write_triplets

pytestmark = pytest.mark.slow


def _settings(repo_root: Path, tmp: Path, student: str, guide: str, **train_kw):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["base"].update({"student": student, "guide": guide})
    raw["train"].update({"max_steps": 2, "batch_size": 8, "logging_steps": 1, **train_kw})
    return settings_from_dict(raw, tmp)


@pytest.fixture
def triplets(repo_root: Path, tmp_path: Path) -> Path:
    return write_triplets(repo_root, tmp_path / "triplets.parquet", per_task=40, seed=1)


def test_task_homogeneous_dataset_split(triplets: Path) -> None:
    by_task = build_train_dataset(triplets, task_homogeneous=True)
    assert set(by_task) == {
        "Banking77Classification",
        "EmotionClassification",
        "TweetSentimentExtractionClassification",
    }
    assert all(ds.column_names == ["anchor", "positive", "negative"] for ds in by_task.values())
    flat = build_train_dataset(triplets, task_homogeneous=False)
    assert len(flat) == sum(len(ds) for ds in by_task.values()) == 120


@pytest.mark.parametrize("loss", ["gist", "mnrl"])
def test_train_writes_a_loadable_checkpoint_and_logs(
    loss: str, repo_root: Path, tmp_path: Path, tiny_model_dir: Path, triplets: Path
) -> None:
    settings = _settings(repo_root, tmp_path, str(tiny_model_dir), str(tiny_model_dir), loss=loss)
    logged: list[tuple[int, dict]] = []
    result = train(settings, triplets, on_log=lambda values, step: logged.append((step, values)))
    assert result.steps == 2 and result.output_dir == tmp_path / "outputs/candidate"
    assert [step for step, values in logged if "loss" in values] == [1, 2]
    metrics = json.loads((result.output_dir / TRAIN_METRICS_FILE).read_text())
    assert metrics["steps"] == 2 and len(metrics["history"]) >= 2
    assert not (tmp_path / "outputs/candidate.partial").exists()
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(result.output_dir)).encode(["x"]).shape == (1, 32)


def test_train_by_epochs_learns(repo_root: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    few = write_triplets(repo_root, tmp_path / "few.parquet", per_task=8, seed=2)  # 24 rows, 3 tasks of 8
    epochs, batch_size = 3, 4
    settings = _settings(
        repo_root,
        tmp_path,
        str(tiny_model_dir),
        str(tiny_model_dir),
        max_steps=None,
        num_train_epochs=epochs,
        batch_size=batch_size,
        loss="mnrl",
        save_steps=None,
        learning_rate=1e-3,
        warmup_ratio=0.0,
    )
    result = train(settings, few)
    steps_per_epoch = 3 * (8 // batch_size)  # each task's 8 rows make 2 one-task batches
    assert result.steps == epochs * steps_per_epoch
    logged = [entry for entry in result.history if "loss" in entry]
    assert [entry["step"] for entry in logged] == list(range(1, epochs * steps_per_epoch + 1))
    assert logged[-1]["epoch"] == pytest.approx(epochs), "the run ends after the configured passes"
    first = sum(e["loss"] for e in logged[:steps_per_epoch]) / steps_per_epoch
    last = sum(e["loss"] for e in logged[-steps_per_epoch:]) / steps_per_epoch
    assert last < first, f"the loss over the last pass ({last:.3f}) is below the first pass's ({first:.3f})"


def test_guided_training_changes_minilm(repo_root: Path, tmp_path: Path, minilm_dir: Path, triplets: Path) -> None:
    from sentence_transformers import SentenceTransformer

    settings = _settings(repo_root, tmp_path, str(minilm_dir), str(minilm_dir), max_steps=2)
    result = train(settings, triplets)
    before = SentenceTransformer(str(minilm_dir)).encode(["How do I top up my card?"])
    after = SentenceTransformer(str(result.output_dir)).encode(["How do I top up my card?"])
    assert abs(before - after).max() > 1e-4, "two steps at lr 2e-5 must move the weights"
    assert result.steps == settings.train.max_steps == 2
    assert [entry["step"] for entry in result.history if "loss" in entry] == [1, 2]


def test_unloadable_model_is_a_clear_error(repo_root: Path, tmp_path: Path, triplets: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "empty-model" / "config.json").write_text("{}")
    settings = _settings(repo_root, tmp_path, str(tmp_path / "empty-model"), str(tmp_path / "empty-model"))
    with pytest.raises(ModelError, match="could not load model"):
        train(settings, triplets)


def test_the_same_inputs_return_the_kept_model_without_training(
    repo_root: Path, tmp_path: Path, tiny_model_dir: Path, triplets: Path
) -> None:
    """The training key is content: same data, settings, weights and code return the kept model; a change trains."""
    import shutil

    from gist_core.models import fingerprint
    from gist_core.training.trainer import FINAL_MODEL, stored_model

    settings = _settings(repo_root, tmp_path, str(tiny_model_dir), str(tiny_model_dir), loss="mnrl", save_steps=1)
    first = train(settings, triplets)
    assert not first.reused and len(first.key) == 16
    run_dir = tmp_path / "outputs/checkpoints" / first.key
    assert sorted(p.name for p in run_dir.iterdir()) == [FINAL_MODEL], "checkpoints removed, the model kept"
    assert stored_model(settings, first.key) == run_dir / FINAL_MODEL
    weights = fingerprint(first.output_dir)

    # the student under another path and name, same files: still the same key
    moved = tmp_path / "elsewhere" / "renamed-student"
    shutil.copytree(tiny_model_dir, moved)
    same = _settings(repo_root, tmp_path, str(moved), str(moved), loss="mnrl", save_steps=1, logging_steps=2)
    shutil.rmtree(first.output_dir)
    logged: list[int] = []
    second = train(same, triplets, on_log=lambda values, step: logged.append(step))
    assert second.reused and second.key == first.key and logged == [], "nothing trained"
    assert fingerprint(second.output_dir) == weights
    assert (second.steps, second.train_loss, second.history) == (first.steps, first.train_loss, first.history)
    assert json.loads((second.output_dir / TRAIN_METRICS_FILE).read_text())["reused"] is True

    # a setting that changes the result trains again; only train.cached_models finished models are kept
    keys = [first.key]
    for lr in (1e-4, 1e-3):
        changed = train(_settings(repo_root, tmp_path, str(moved), str(moved), loss="mnrl", learning_rate=lr), triplets)
        assert not changed.reused and changed.key not in keys
        keys.append(changed.key)
    kept = sorted(p.name for p in (tmp_path / "outputs/checkpoints").iterdir())
    assert kept == sorted(keys[1:]), "the least recently used is removed (train.cached_models: 2)"

    # train.cached_models 0: never reused, nothing kept
    off = _settings(repo_root, tmp_path, str(moved), str(moved), loss="mnrl", learning_rate=1e-3, cached_models=0)
    assert stored_model(off, keys[-1]) is None
    assert not train(off, triplets).reused
