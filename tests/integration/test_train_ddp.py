"""`torchrun --nproc_per_node 2 -m gist_core train` on CPU (gloo): DDP with in-batch negatives gathered
across both processes; only rank 0 saves the model and reports to MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.model.test_train_triplets import write_triplets

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STEPS = 3


def test_torchrun_two_processes_gather_and_rank0_reports(repo_root: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    from gist_core import registry
    from gist_core.config import load_settings

    project = tmp_path / "proj"
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["base"].update({"student": str(tiny_model_dir), "guide": str(tiny_model_dir)})
    params["train"].update({"max_steps": STEPS, "save_steps": 2, "batch_size": 4, "logging_steps": 1})
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_triplets(repo_root, project / "data/prepared/triplets.parquet", per_task=24, seed=5)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(repo_root) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, "-m", "gist_core", "train", "--root", str(project)],
        cwd=project,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.count(f"trained {STEPS} steps") == 1, "only rank 0 reports"

    metrics = json.loads((project / "outputs/candidate/train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["gather_across_devices"] is True
    assert (metrics["steps"], metrics["guide"], metrics["loss"]) == (STEPS, "cache", "GISTEmbedLoss")
    assert metrics["examples"] == STEPS * 4 * 2
    assert not any((project / "outputs/checkpoints").iterdir()), "checkpoints are removed after the final save"
    assert (project / "data/prepared/guide_cache/manifest.json").is_file()

    settings = load_settings(project)
    mlc = registry.client(settings)
    experiment = mlc.get_experiment_by_name(settings.registry.experiment)
    runs = mlc.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "rank 1 must not start a run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["train.batch_size"] == "4"
    assert [m.step for m in mlc.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, STEPS + 1))
    masked = mlc.get_metric_history(run.info.run_id, "train/guide_masked_fraction")
    assert len(masked) == STEPS and all(0.0 <= m.value <= 1.0 for m in masked)
    assert run.data.metrics["train/examples_per_second"] > 0
