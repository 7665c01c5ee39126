"""The whole pipeline, as a user runs it: `gist pipeline` in a real git + DVC project, MLflow on SQLite.

Real MiniLM (student and guide), a few hundred triplets, three training steps, STSBenchmark only.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from gist_core.config import load_settings
from gist_core.registry import client, history
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


def test_champion_card_carries_the_run_values(pipeline_run) -> None:
    """The card logged with version 1 (README.md of its MLflow model) holds this run's real numbers."""
    project, _ = pipeline_run
    settings = load_settings(project)
    proc = run([*GIST, "registry", "card", "gist-embedding"], project, env=_env(project.parent))
    text = proc.stdout
    front, body = text.split("---\n", 2)[1:]
    evaluation = json.loads((project / "reports" / "eval.json").read_text())
    version = client.client(settings).get_model_version_by_alias("gist-embedding", "champion")
    # mteb's results metadata: one model-index entry per task, with this run's score and task revision
    (entry,) = yaml.safe_load(front)["model-index"]
    (result,) = entry["results"]
    assert result["metrics"][0]["value"] == evaluation["candidate"]["STSBenchmark"]
    assert result["dataset"]["revision"] == evaluation["task_revisions"]["STSBenchmark"]
    assert result["dataset"]["type"] == "local/sts" and result["task"]["type"] == "sentence-similarity"
    cand, base = evaluation["candidate"]["STSBenchmark"], evaluation["baselines"]["base"]["STSBenchmark"]
    assert f"| STSBenchmark | STS | {cand:.4f} | {base:.4f} | {cand - base:+.4f} |" in body
    metrics = json.loads((project / "outputs/candidate/train_metrics.json").read_text())
    triplets = pd.read_parquet(project / "data/prepared/triplets.parquet").groupby("task_name").size()
    for row in [
        "| epochs or steps | 3 steps |",
        f"| checkpoint step | {metrics['steps']} |",
        f"| learning rate | {settings.train.learning_rate:g} |",
        f"| batch size (per device) | {settings.train.batch_size} |",
        f"| temperature | {settings.train.temperature:g} |",
        f"| warmup ratio | {settings.train.warmup_ratio:g} |",
        f"| mean training loss | {metrics['train_loss']:.4f} |",
        *(f"| {task} | {count} |" for task, count in triplets.items()),
    ]:
        assert row in body, row
    assert version.tags["gist.data_version"] in body and version.run_id in body
    assert version.tags["gist.model_fingerprint"] in body and version.tags["gist.train_key"] in body
    assert version.tags["gist.gate.summary"] in body and "## Promotion decision" in body
    assert 'load_model("models:/gist-embedding@champion")' in body


def test_rerun_with_nothing_changed_registers_nothing(pipeline_run) -> None:
    """The same command again: training returns the kept model, the run ends Unchanged, no version is created."""
    project, _ = pipeline_run
    eval_json = project / "reports" / "eval.json"
    evaluated_at = eval_json.stat().st_mtime_ns
    proc = run([*GIST, "pipeline"], project, env=_env(project.parent))
    assert "unchanged: same model as version 1 (passed, challenger, champion); nothing registered" in proc.stdout
    assert "(training reused)" in proc.stdout and "gate" not in proc.stdout.split("== GIST pipeline finished ==")[1]
    settings = load_settings(project)
    mlc = client.client(settings)
    assert [str(v.version) for v in mlc.search_model_versions("name='gist-embedding'")] == ["1"]
    assert eval_json.stat().st_mtime_ns == evaluated_at, "nothing was evaluated"
    (rerun,) = mlc.search_runs(
        [mlc.get_experiment_by_name(settings.registry.experiment).experiment_id],
        "tags.`gist.outcome` = 'unchanged'",
    )
    assert rerun.data.tags["gist.same_as_version"] == "1" and rerun.data.metrics["train/reused"] == 1.0
    assert rerun.info.status == "FINISHED"
    assert len(history.champion_events(settings)) == 1


def test_dvc_is_clean_and_data_pushed(pipeline_run) -> None:
    project, _ = pipeline_run
    status = run([sys.executable, "-m", "dvc", "status"], project).stdout
    assert "up to date" in status.lower(), status
    cloud = run([sys.executable, "-m", "dvc", "status", "--cloud"], project).stdout
    assert "up to date" in cloud.lower() or "in sync" in cloud.lower(), cloud


def test_registering_the_champion_again_registers_nothing(pipeline_run) -> None:
    """`gist register` on the candidate that is already version 1 (the CLI path of a blocked or stale
    registration is in tests/integration/test_registry_reruns.py, on a tiny model)."""
    project, _ = pipeline_run
    same = run([*GIST, "register", "--set", "gate.min_mean_delta=0.5"], project, env=_env(project.parent))
    assert "unchanged: same model as version 1 (passed, challenger, champion); nothing registered" in same.stdout
    mlc = client.client(load_settings(project))
    assert [str(v.version) for v in mlc.search_model_versions("name='gist-embedding'")] == ["1"]


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
