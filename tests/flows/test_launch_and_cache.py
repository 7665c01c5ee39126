"""The torchrun launcher's command, and the data task's cache key and params handling (no servers)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import yaml

from flows.caching import data_cache_key, dvc_params_applied
from flows.launch import torchrun_command
from gist_core.cli import parse_overrides
from gist_core.config import load_settings, with_overrides
from tests.support.projects import REPO


def _project(tmp_path: Path) -> Path:
    """A folder shaped like the pipeline's project as far as the cache key looks: no DVC run needed."""
    root = tmp_path / "proj"
    (root / "gist_core").mkdir(parents=True)
    (root / "gist_core" / "data.py").write_text("# data code\n")
    (root / "data" / "raw" / "classification").mkdir(parents=True)
    (root / "data" / "raw" / "classification" / "a.csv").write_text("text,label\nx,1\n")
    (root / "data" / "prepared").mkdir(parents=True)
    out = root / "data" / "prepared" / "triplets.parquet"
    out.write_bytes(b"triplets v1")
    (root / ".dvc").mkdir()
    (root / ".dvc" / "config").write_text("[core]\n    remote = local\n")
    stages = {
        "data": {
            "cmd": "gist data",
            "deps": ["gist_core/data.py", "data/raw/classification"],
            "params": ["base.seed", "data"],
            "outs": ["data/prepared/triplets.parquet"],
        },
        "guide_cache": {
            "cmd": "gist guide-cache",
            "deps": ["data/prepared/triplets.parquet"],
            "params": ["base.guide", "train.max_seq_length"],
            "outs": ["data/prepared/guide_cache"],
        },
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    lock = {"schema": "2.0", "stages": {"data": {"outs": [{"path": "data/prepared/triplets.parquet", "md5": ""}]}}}
    lock["stages"]["data"]["outs"][0]["md5"] = hashlib.md5(out.read_bytes()).hexdigest()
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return root


def test_torchrun_command_runs_gist_train_with_the_run_settings(tmp_path: Path) -> None:
    settings = with_overrides(load_settings(REPO), {"orchestration.nproc_per_node": 2})
    overrides = {"train.max_steps": 3, "base.student": "all-MiniLM-L6-v2", "evaluate.tasks": ["STSBenchmark"]}
    cmd = torchrun_command(settings, "run123", overrides)
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5:13] == ["-m", "gist_core", "train", "--root", str(REPO), "--run-id", "run123", "--set"]
    sets = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--set"]
    # each rank parses the --set values back to exactly the run's overrides
    assert parse_overrides(sets) == overrides
    assert torchrun_command(load_settings(REPO), "r")[4] == "--nproc_per_node=gpu"


def test_data_cache_key_follows_what_dvc_looks_at(tmp_path: Path) -> None:
    root = _project(tmp_path)
    settings = load_settings(root)
    key = data_cache_key(settings)
    assert key and key == data_cache_key(load_settings(root)), "unchanged inputs must give the same key"
    assert data_cache_key(with_overrides(settings, {"data.max_per_task": 5})) != key, "data params"
    assert data_cache_key(with_overrides(settings, {"base.guide": "x/y"})) != key, "a param of another stage"
    assert data_cache_key(with_overrides(settings, {"train.max_steps": 5})) == key, "params no stage reads"
    raw = root / "data" / "raw" / "classification" / "a.csv"
    raw.write_text("text,label\nx,2\n")
    assert data_cache_key(settings) not in (None, key), "a changed input file"
    raw.write_text("text,label\nx,1\n")
    assert data_cache_key(settings) == key
    (root / ".dvc" / "config").write_text("[core]\n    remote = other\n")
    assert data_cache_key(settings) != key, "another remote"


def test_no_cache_key_when_the_output_is_not_the_locked_one(tmp_path: Path) -> None:
    root = _project(tmp_path)
    settings = load_settings(root)
    out = root / "data" / "prepared" / "triplets.parquet"
    out.write_bytes(b"something else")
    assert data_cache_key(settings) is None
    out.unlink()
    assert data_cache_key(settings) is None
    (root / "dvc.lock").unlink()
    assert data_cache_key(settings) is None


def test_data_overrides_reach_params_yaml_only_while_dvc_runs(tmp_path: Path) -> None:
    root = _project(tmp_path)
    original = (root / "params.yaml").read_bytes()
    settings = load_settings(root)
    with dvc_params_applied(with_overrides(settings, {"train.max_steps": 3})) as changed:
        assert not changed and (root / "params.yaml").read_bytes() == original
    run = with_overrides(settings, {"data.max_per_task": 5, "base.seed": 7, "base.guide": "all-MiniLM-L6-v2"})
    with dvc_params_applied(run) as changed:
        during = yaml.safe_load((root / "params.yaml").read_text())
        assert changed and during["data"]["max_per_task"] == 5 and during["base"]["seed"] == 7
        assert during["base"]["guide"] == "all-MiniLM-L6-v2", "the guide_cache stage reads base.guide"
        assert during["train"] == yaml.safe_load(original)["train"]
    assert (root / "params.yaml").read_bytes() == original, "restored byte for byte (comments too)"
    assert json.loads(json.dumps(during["data"]["classification"]))[0]["name"] == "Banking77Classification"


def test_a_rerun_with_unchanged_inputs_skips_the_data_task(tmp_path: Path, prefect_harness, monkeypatch) -> None:
    from prefect import flow

    from flows import pipeline
    from gist_core import stages
    from gist_core.versioning import DataVersion

    root = _project(tmp_path)
    calls = []

    def fake_version_data(settings, push=True):
        calls.append(settings.data.max_per_task)
        return DataVersion("data", "data/prepared/triplets.parquet", "md5-1", "local /remote")

    monkeypatch.setattr(stages, "run_version_data", fake_version_data)

    @flow
    def data_only(overrides: dict):
        settings = with_overrides(load_settings(root), overrides)
        return pipeline.version_data(settings, return_state=True)

    first = data_only({})
    second = data_only({})
    assert first.is_completed() and second.is_completed() and second.name == "Cached"
    assert second.result().md5 == "md5-1"
    configured = load_settings(root).data.max_per_task  # params.yaml's value
    assert calls == [configured], "unchanged inputs: DVC is not called again"
    third = data_only({"data.max_per_task": 5})
    assert third.name != "Cached" and calls == [configured, 5], "changed data params rerun the task"


def test_only_remote_and_registry_io_is_retried() -> None:
    from flows.pipeline import is_transient
    from gist_core.errors import ConfigError, DataError, RegistryError, VersioningError

    assert is_transient(VersioningError("`dvc push data` failed in /p:\nconnection reset"))
    assert is_transient(RegistryError("MLflow at http://m:5000 refused to create a run"))
    assert is_transient(ConnectionError("reset"))
    assert not is_transient(VersioningError("`dvc repro data` failed in /p:\nKeyError"))
    assert not is_transient(VersioningError("/p: no default DVC remote; add one"))
    assert not is_transient(DataError("missing file")) and not is_transient(ConfigError("bad value"))
