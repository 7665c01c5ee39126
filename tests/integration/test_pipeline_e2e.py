"""The whole pipeline, as a user runs it: `gist pipeline` in a real git + DVC project, MLflow on SQLite.

Real MiniLM (student and guide), a few hundred triplets, three training steps, STSBenchmark only.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from gist_core.config import load_settings
from gist_core.registry import client
from gist_core.versioning import lock_md5
from tests.support.projects import cli_env, make_project, run, tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]
GIST = [sys.executable, "-m", "flows"]  # the installed `gist` command


def _env(tmp: Path) -> dict[str, str]:
    return cli_env(tmp)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    tmp = tmp_path_factory.mktemp("e2e")
    params = tiny_params(models_dir, tmp)
    # a gate every candidate passes, so the first run must end as champion
    params["gate"].update({"min_mean_delta": -1.0, "max_task_regression": 1.0})
    project = make_project(tmp / "proj", params)
    proc = run([*GIST, "pipeline"], project, env=_env(tmp))
    return project, proc


def test_pipeline_registers_a_champion_with_lineage(pipeline_run) -> None:
    project, proc = pipeline_run
    out = proc.stdout
    assert "gate passed" in out, out[-2000:]
    assert "registered gist-embedding version 1 (challenger, champion)" in out
    settings = load_settings(project)
    mlc = client.client(settings)
    version = mlc.get_model_version_by_alias("gist-embedding", "champion")
    assert str(version.version) == "1"
    data_md5 = lock_md5(project, "data", "data/prepared/triplets.parquet")
    assert version.tags["gist.data_version"] == data_md5
    assert len(version.tags["gist.git_commit"].split("-")[0]) == 40
    run_ = mlc.get_run(version.run_id)
    metrics = run_.data.metrics
    assert 0.5 < metrics["eval/STSBenchmark"] <= 1.0 and 0.5 < metrics["base/STSBenchmark"] <= 1.0
    assert metrics["delta/STSBenchmark"] == pytest.approx(metrics["eval/STSBenchmark"] - metrics["base/STSBenchmark"])
    assert run_.data.params["train.max_steps"] == "3"
    assert run_.data.tags["gist.data_version"] == data_md5 and run_.info.status == "FINISHED"
    assert [m.step for m in mlc.get_metric_history(run_.info.run_id, "train/loss")] == [1, 2, 3]
    summary = json.loads((project / "reports" / "eval.json").read_text())
    assert set(summary["candidate"]) == {"STSBenchmark"}


def test_dvc_is_clean_and_data_pushed(pipeline_run) -> None:
    project, _ = pipeline_run
    status = run([sys.executable, "-m", "dvc", "status"], project).stdout
    assert "up to date" in status.lower(), status
    cloud = run([sys.executable, "-m", "dvc", "status", "--cloud"], project).stdout
    assert "up to date" in cloud.lower() or "in sync" in cloud.lower(), cloud


def test_blocked_registration_keeps_champion_and_records_why(pipeline_run) -> None:
    project, _ = pipeline_run
    proc = run([*GIST, "register", "--set", "gate.min_mean_delta=0.5"], project, env=_env(project.parent))
    assert "gate blocked" in proc.stdout and "mean delta" in proc.stdout
    settings = load_settings(project)
    mlc = client.client(settings)
    blocked = mlc.get_model_version("gist-embedding", "2")
    assert blocked.tags["gist.gate.verdict"] == "blocked"
    assert "mean delta" in blocked.tags["gist.gate.reasons"]
    assert not blocked.aliases
    assert str(mlc.get_model_version_by_alias("gist-embedding", "champion").version) == "1"


def test_bad_input_fails_cleanly_without_registering(pipeline_run) -> None:
    project, _ = pipeline_run
    env = _env(project.parent)
    settings = load_settings(project)
    before = len(client.client(settings).search_model_versions("name='gist-embedding'"))
    unknown = run([*GIST, "pipeline", "--set", "base.student=no-such-model"], project, check=False, env=env)
    assert unknown.returncode == 1
    assert unknown.stderr.strip().splitlines()[-1].startswith("error: unknown model 'no-such-model'")
    assert "prefect" not in unknown.stderr.lower(), "bad settings must fail before the flow starts"
    bad_value = run([*GIST, "pipeline", "--set", "train.batch_size=-3"], project, check=False, env=env)
    assert bad_value.returncode == 1 and "train.batch_size" in bad_value.stderr
    params = yaml.safe_load((project / "params.yaml").read_text())
    moved = project / "data/raw/classification/emotion/train.txt"
    shutil.move(moved, moved.with_suffix(".bak"))
    try:
        missing = run([*GIST, "pipeline"], project, check=False, env=env)
    finally:
        shutil.move(moved.with_suffix(".bak"), moved)
    assert missing.returncode == 1 and "emotion/train.txt" in missing.stderr
    assert "data.classification 'EmotionClassification'" in missing.stderr
    assert params["base"]["student"] == "all-MiniLM-L6-v2"
    after = len(client.client(settings).search_model_versions("name='gist-embedding'"))
    assert after == before
