"""Registration and aliases against a real MLflow SQLite store (a tiny random model keeps it quick)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gist_core import registry
from gist_core.config import GateSettings, settings_from_dict
from gist_core.gate import decide


@pytest.fixture
def settings(tmp_path: Path, repo_root: Path):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["registry"].update(
        {
            "tracking_uri": "sqlite:///store/mlflow.db",
            "artifact_location": "artifacts",
            "model_name": "gist-test",
        }
    )
    return settings_from_dict(raw, tmp_path)


def test_register_pass_then_block_keeps_champion(settings, tiny_model_dir: Path, tmp_path: Path) -> None:
    scores = {"STSBenchmark": 0.80}
    run_id = registry.start_run(settings, "test", tags={"data_version": "abc"})
    registry.log_params(settings, run_id, {"train.max_steps": 3, "evaluate.tasks": ["STSBenchmark"]})
    registry.log_metrics(settings, run_id, {"eval/STSBenchmark": 0.8})
    v1 = registry.register_model(settings, run_id, tiny_model_dir, {"data_version": "abc"}, "first")
    passed = decide({"STSBenchmark": 0.81}, scores, GateSettings(max_task_regression=0.01))
    v1 = registry.apply_decision(settings, v1, passed)
    registry.end_run(settings, run_id)
    assert v1.aliases == ("challenger", "champion")
    assert registry.champion_version(settings) == v1.version
    tags = registry.version_tags(settings, v1.version)
    assert tags["gist.data_version"] == "abc" and tags["gist.gate.verdict"] == "passed"
    assert (tmp_path / "artifacts").is_dir(), "artifacts must go to the configured location"

    run2 = registry.start_run(settings, "test2")
    v2 = registry.register_model(settings, run2, tiny_model_dir, {"data_version": "def"}, "second")
    blocked = decide({"STSBenchmark": 0.70}, scores, GateSettings(max_task_regression=0.01))
    v2 = registry.apply_decision(settings, v2, blocked)
    assert v2.aliases == () and registry.champion_version(settings) == v1.version
    tags2 = registry.version_tags(settings, v2.version)
    assert tags2["gist.gate.verdict"] == "blocked"
    assert "max_task_regression" not in tags2["gist.gate.reasons"] or tags2["gist.gate.reasons"]
    assert "worst task STSBenchmark" in tags2["gist.gate.reasons"]

    champion = registry.load_model(settings, "champion")
    assert champion.encode(["two", "texts"]).shape == (2, 32)

    mlc = registry.client(settings)
    run = mlc.get_run(run_id)
    assert run.data.params["train.max_steps"] == "3" and run.data.metrics["eval/STSBenchmark"] == 0.8
    assert run.data.tags["gist.data_version"] == "abc" and run.info.status == "FINISHED"


def test_discard_version_and_failed_run(settings, tiny_model_dir: Path) -> None:
    run_id = registry.start_run(settings, "to-discard")
    version = registry.register_model(settings, run_id, tiny_model_dir, {}, "d")
    registry.discard_version(settings, version)
    versions = registry.client(settings).search_model_versions(f"name='{settings.registry.model_name}'")
    assert [v.version for v in versions] == []
    with pytest.raises(RuntimeError), registry.failing_run_marks_failed(settings, run_id):
        raise RuntimeError("boom")
    assert registry.client(settings).get_run(run_id).info.status == "FAILED"
