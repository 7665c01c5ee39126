"""`gist ablation --quick` as a user runs it: a real git + DVC project, Prefect, MLflow on SQLite.

A tiny random student (fast to train and score) guided by the real MiniLM, on STSBenchmark; the
arms are base, MNRL, GIST with the guide-embedding cache and GIST with the live guide.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from flows.ablation import AblationParameters, apply_ablation_parameters
from gist_core.ablation.plan import RESULT_FILE, plan, run_key
from gist_core.ablation.runner import execute_run
from gist_core.config import load_settings, with_overrides
from gist_core.registry import client
from tests.support.projects import cli_env, make_project, run, tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]
GIST = [sys.executable, "-m", "flows"]  # the installed `gist` command
ARMS = [
    {"name": "base", "base": True},
    {"name": "mnrl", "train": {"loss": "mnrl"}},
    {"name": "gist", "train": {"loss": "gist", "guide_cache": True}},
    {"name": "gist-live", "train": {"loss": "gist", "guide_cache": False}},
    # a mining variant: trains on its own re-mined data (random same-label positives)
    {"name": "gist-randpos", "train": {"loss": "gist"}, "mining": {"positive_strategy": "random"}},
]
RUNS = 1 + 4 * 2 * 2  # base once; 4 trained arms x 2 noise levels x 2 seeds


def _env(tmp: Path) -> dict[str, str]:
    env = cli_env(tmp)
    # The tiny student's matrices are so small that 2 OpenMP threads spend their time waiting for each
    # other whenever anything else runs (25x slower than 1 thread at load average 3).
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_model_dir: Path):
    tmp = tmp_path_factory.mktemp("ablation")
    params = tiny_params(models_dir, tmp)
    params["base"]["student"] = str(tiny_model_dir)
    params["ablation"] = {"arms": ARMS, "compare": [["gist", "mnrl"], ["gist", "base"], ["mnrl", "base"]]}
    project = make_project(tmp / "proj", params)
    proc = run([*GIST, "ablation", "--quick"], project, env=_env(tmp))
    return project, proc, tmp


def test_quick_ablation_reports_every_arm_with_spreads(ablation_run) -> None:
    project, proc, _ = ablation_run
    out = project / "outputs" / "ablation-quick"
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["arms"] == ["base", "mnrl", "gist", "gist-live", "gist-randpos"] and summary["runs"] == RUNS
    for arm in ("mnrl", "gist", "gist-live", "gist-randpos"):
        for noise in ("0.00", "0.40"):
            cell = summary["cells"][arm][noise]["STSBenchmark"]
            assert cell["n"] == 2 and 0 < cell["mean"] <= 1
    assert any(
        summary["cells"][arm][n]["STSBenchmark"]["std"] > 0 for arm in ("mnrl", "gist") for n in ("0.00", "0.40")
    )
    verdicts = {c["verdict"] for c in summary["comparisons"]}
    assert verdicts <= {"win", "loss", "tie"} and verdicts
    markdown = (out / "ablation.md").read_text()
    assert (
        "| gist-live | 40% |" in markdown
        and "## Verdicts" in markdown
        and "Command: `gist ablation --quick`" in markdown
    )
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert "== GIST ablation finished ==" in proc.stdout
    assert not (project / "docs" / "ablation.md").exists(), "--quick must not overwrite the docs table"


def test_cached_and_live_guide_agree_and_masking_is_split_by_label(ablation_run) -> None:
    project, _, _ = ablation_run
    summary = json.loads((project / "outputs" / "ablation-quick" / "ablation.json").read_text())
    [agreement] = summary["agreement"]
    assert agreement["arms"] == ["gist", "gist-live"] and agreement["pairs"] == 4
    assert agreement["max_abs_difference"] < 1e-3
    rates = summary["masked"]["gist"]["0.40"]
    assert {"guide_masked_fraction", "guide_masked_same_label", "guide_masked_other_label"} <= set(rates)
    assert summary["masked"]["gist"]["0.40"] == pytest.approx(summary["masked"]["gist-live"]["0.40"], abs=1e-6)
    [noise] = summary["data"]["default"]["noise"][:1]
    rows = noise["rows"]
    assert noise["corrupted_positive"] + noise["corrupted_negative"] + noise["no_replacement"] == round(0.4 * rows)
    corrupted = project / "outputs" / "ablation-quick" / "data" / "default" / "noise-0.40-seed-1.corrupted.csv"
    assert len(corrupted.read_text().splitlines()) == 1 + noise["corrupted_positive"] + noise["corrupted_negative"]


def test_a_mining_variant_trains_on_its_own_data(ablation_run) -> None:
    project, _, _ = ablation_run
    out = project / "outputs" / "ablation-quick"
    summary = json.loads((out / "ablation.json").read_text())
    variant = summary["data"]["gist-randpos"]
    assert variant["source"] == "outputs/ablation-quick/data/gist-randpos/prepared/triplets.parquet"
    assert variant["md5"] != summary["data"]["default"]["md5"]
    mined = json.loads((out / "data" / "gist-randpos" / "prepared" / "mined" / "report.json").read_text())
    assert mined["params"]["mining"]["positive_strategy"] == "random"
    record = json.loads((out / "runs" / "gist-randpos" / "noise-0.40" / "seed-1" / RESULT_FILE).read_text())
    assert record["data_file"].endswith("data/gist-randpos/noise-0.40-seed-1.parquet") and record["steps"] == 2
    assert (project / "data" / "prepared" / "triplets.parquet").is_file(), "the default data is untouched"


def test_mlflow_holds_a_parent_run_with_a_child_per_arm_and_seed(ablation_run) -> None:
    project, _, _ = ablation_run
    settings = load_settings(project)
    mlc = client.client(settings)
    experiment = mlc.get_experiment_by_name("gist-ablation")
    runs = mlc.search_runs([experiment.experiment_id], max_results=100)
    [parent] = [r for r in runs if r.info.run_name == "ablation"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == RUNS and all(r.info.status == "FINISHED" for r in [parent, *children])
    artifacts = {a.path for a in mlc.list_artifacts(parent.info.run_id, "ablation")}
    assert artifacts == {"ablation/ablation.md", "ablation/ablation.png", "ablation/ablation.json"}
    [gist_child] = [r for r in children if r.info.run_name == "gist noise-0.40 seed-2"]
    assert len(mlc.get_metric_history(gist_child.info.run_id, "train/loss")) == 2
    assert "train/guide_masked_same_label" in gist_child.data.metrics
    assert 0 < gist_child.data.metrics["eval/STSBenchmark"] <= 1
    assert "gist.ablation.seed" in gist_child.data.tags


def test_a_rerun_reuses_finished_runs(ablation_run) -> None:
    """Every run stored a result keyed by its settings; running it again reads it back (no training)."""
    project, _, _ = ablation_run
    out = project / "outputs" / "ablation-quick"
    results = sorted((out / "runs").rglob(RESULT_FILE))
    assert len(results) == RUNS
    before = {p: p.stat().st_mtime_ns for p in results}
    settings = apply_ablation_parameters(load_settings(project), AblationParameters(quick=True))
    data = json.loads((out / "ablation.json").read_text())["data"]
    specs = plan(settings)
    assert len(specs) == RUNS
    for spec in (specs[0], specs[-1]):  # the base arm and a trained arm
        record = execute_run(settings, spec, data)
        assert record.reused and record.scores
    assert {p: p.stat().st_mtime_ns for p in results} == before
    # a changed setting that decides the result is a different run: not reused
    changed = with_overrides(settings, {"ablation.max_steps": 3})
    assert run_key(changed, specs[-1], data["default"]["md5"]) != run_key(settings, specs[-1], data["default"]["md5"])
