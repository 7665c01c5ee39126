"""Training with the guide-embedding cache, the live guide and GradCache, on a tiny random BERT.

The cache is built once per guide and data version, reused while they stay the same, rebuilt when
the data changes; training from it follows the same loss curve as training with the live guide.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from gist_core.config import settings_from_dict
from gist_core.training.guide_cache import EMBEDDINGS_FILE, MANIFEST_FILE, read_manifest
from gist_core.training.trainer import TRAIN_METRICS_FILE, load_guide, train, training_arguments
from tests.support.triplets import write_triplets

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def triplets(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_triplets(repo_root, tmp_path_factory.mktemp("guide-cache") / "triplets.parquet", per_task=30, seed=4)


def _settings(repo_root: Path, root: Path, model: Path, **train_kw):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["base"].update({"student": str(model), "guide": str(model)})
    raw["train"].update({"max_steps": 3, "batch_size": 8, "logging_steps": 1, "save_steps": None, **train_kw})
    return settings_from_dict(raw, root)


def _losses(result) -> list[float]:
    return [entry["loss"] for entry in result.history if "loss" in entry]


def test_cache_is_built_once_reused_and_rebuilt_for_new_data(
    repo_root: Path, tmp_path: Path, tiny_model_dir: Path, triplets: Path
) -> None:
    settings = _settings(repo_root, tmp_path, tiny_model_dir)
    logged: list[dict] = []
    first = train(settings, triplets, on_log=lambda values, step: logged.append(values))
    cache_dir = tmp_path / "data/prepared/guide_cache"
    manifest = read_manifest(cache_dir)
    frame = pd.read_parquet(triplets)
    distinct = frame[["anchor", "positive", "negative"]].stack().nunique()
    assert manifest["texts"] == 3 * len(frame) and 0 < manifest["entries"] <= distinct
    assert not manifest["retokenized"]
    assert (first.guide, first.loss) == ("cache", "GISTEmbedLoss")
    step_logs = [values for values in logged if "loss" in values]
    assert len(step_logs) == 3
    assert all(0.0 <= v["guide_masked_fraction"] <= 1.0 and v["examples_per_second"] > 0 for v in step_logs)
    assert "learning_rate" in step_logs[0]
    saved = json.loads((first.output_dir / TRAIN_METRICS_FILE).read_text())
    assert [e["step"] for e in saved["history"] if "guide_masked_fraction" in e] == [1, 2, 3]

    built = (cache_dir / EMBEDDINGS_FILE).stat().st_mtime_ns
    second = train(settings, triplets)
    assert (cache_dir / EMBEDDINGS_FILE).stat().st_mtime_ns == built, "an up-to-date cache is reused"
    assert _losses(second) == pytest.approx(_losses(first), rel=1e-6), "same seed, same data: same run"

    changed = tmp_path / "triplets-v2.parquet"
    pd.read_parquet(triplets).iloc[:-5].to_parquet(changed)
    train(settings, changed)
    rebuilt = json.loads((cache_dir / MANIFEST_FILE).read_text())
    assert rebuilt["identity"]["data_md5"] != manifest["identity"]["data_md5"]


def test_cached_guide_trains_like_the_live_guide(
    repo_root: Path, tmp_path: Path, tiny_model_dir: Path, triplets: Path
) -> None:
    cached = train(_settings(repo_root, tmp_path / "cached", tiny_model_dir), triplets)
    live = train(_settings(repo_root, tmp_path / "live", tiny_model_dir, guide_cache=False), triplets)
    assert (cached.guide, live.guide) == ("cache", "model")
    assert _losses(cached) == pytest.approx(_losses(live), rel=1e-5)
    masked = [[e["guide_masked_fraction"] for e in r.history if "loss" in e] for r in (cached, live)]
    assert masked[0] == pytest.approx(masked[1])


def test_live_guide_is_frozen_in_eval_mode(repo_root: Path, tmp_path: Path, tiny_model_dir: Path, triplets: Path):
    """The guide must not apply dropout (its embeddings would then differ from the cache's) nor need gradients."""
    from gist_core.models import ModelRef, load_sentence_transformer

    settings = _settings(repo_root, tmp_path, tiny_model_dir, guide_cache=False)
    ref = ModelRef(str(tiny_model_dir), "path", str(tiny_model_dir))
    student = load_sentence_transformer(ref, 64, "cpu")
    args = training_arguments(settings, tmp_path / "run", "cpu", 1)
    guide, kind = load_guide(settings, triplets, student, ref, "cpu", args)
    assert kind == "model" and not any(m.training for m in guide.modules())
    assert not any(p.requires_grad for p in guide.parameters())


def test_gradcache_training(repo_root: Path, tmp_path: Path, tiny_model_dir: Path, triplets: Path) -> None:
    result = train(_settings(repo_root, tmp_path, tiny_model_dir, mini_batch_size=3), triplets)
    assert result.loss == "CachedGISTEmbedLoss" and result.steps == 3 and math.isfinite(result.train_loss)
    assert all("guide_masked_fraction" in e for e in result.history if "loss" in e)


def test_guide_cache_command_writes_the_dvc_stage_output(
    repo_root: Path, tmp_path: Path, tiny_model_dir: Path, triplets: Path
) -> None:
    import shutil

    from typer.testing import CliRunner

    from flows.cli import app
    from gist_core.hashing import file_md5

    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["base"].update({"student": str(tiny_model_dir), "guide": str(tiny_model_dir)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "data/prepared").mkdir(parents=True)
    shutil.copy(triplets, tmp_path / "data/prepared/triplets.parquet")
    result = CliRunner().invoke(app, ["guide-cache", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "guide embeddings of 270 texts" in result.output
    manifest = read_manifest(tmp_path / "data/prepared/guide_cache")
    assert manifest["identity"]["data_md5"] == file_md5(triplets)
    assert manifest["identity"]["max_seq_length"] == raw["train"]["max_seq_length"]

    # With the cache off the stage writes an empty placeholder (DVC stays consistent); training
    # with the cache on treats the placeholder as stale and builds the real cache.
    raw["train"]["guide_cache"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["guide-cache", "--root", str(tmp_path)])
    assert result.exit_code == 0 and "no guide embeddings" in result.output, result.output
    assert read_manifest(tmp_path / "data/prepared/guide_cache")["entries"] == 0
    settings = _settings(repo_root, tmp_path, tiny_model_dir, max_steps=1)
    assert train(settings, tmp_path / "data/prepared/triplets.parquet").guide == "cache"
    assert read_manifest(tmp_path / "data/prepared/guide_cache")["entries"] > 0


def test_chunked_build_through_the_store_embeds_each_text_once(
    tiny_model_dir: Path, triplets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built in small chunks into the memory-mapped file (pages released as it goes) through the embedding
    store: the same table as an in-memory build, and a rebuild embeds nothing again."""
    import numpy as np

    from gist_core.models import ModelRef, load_sentence_transformer
    from gist_core.training import guide_cache
    from gist_core.training.guide_cache import build_guide_cache, embed_like_gist_loss, read_guide_cache

    monkeypatch.setattr(guide_cache, "STORE_FLUSH", 16)
    monkeypatch.setattr(guide_cache, "TOKENIZE_CHUNK", 7)
    ref = ModelRef(str(tiny_model_dir), "path", str(tiny_model_dir))
    student = load_sentence_transformer(ref, 32, "cpu")
    guide = load_sentence_transformer(ref, 32, "cpu")
    store = tmp_path / "store"
    first = build_guide_cache(tmp_path / "a", triplets, student, ref, "cpu", False, store_root=store)
    assert first["embedded"] == first["entries"] > 16 and first["from_store"] == 0
    again = build_guide_cache(tmp_path / "b", triplets, student, ref, "cpu", False, store_root=store)
    assert again["embedded"] == 0 and again["from_store"] == again["entries"] == first["entries"]
    manifests = [(tmp_path / d / guide_cache.MANIFEST_FILE).read_bytes() for d in ("a", "b")]
    assert manifests[0] == manifests[1], "the tracked manifest holds no timings or store counts"
    built, _ = read_guide_cache(tmp_path / "a")
    rebuilt, _ = read_guide_cache(tmp_path / "b")
    assert np.array_equal(np.asarray(built.embeddings), np.asarray(rebuilt.embeddings))
    in_memory = embed_like_gist_loss(student, guide, triplets)
    assert np.array_equal(in_memory.index.keys, built.index.keys)
    assert np.allclose(in_memory.embeddings, built.embeddings, atol=1e-5)
