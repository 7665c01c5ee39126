"""The flow's torchrun launcher, for real: two CPU processes (gloo) train a tiny random BERT with the guided loss.

What the fine-tune task runs with ``orchestration.train_launcher: torchrun``: the command from
``flows.launch.torchrun_command`` in a subprocess, then the checkpoint's train_metrics.json. DDP
gathers the in-batch candidates across both processes; the guide is the guide-embedding cache that
rank 0 builds. The run checkpoints mid-run, as the default settings do: the trainer saves its
arguments, including the multi-process batch sampler factories (``gist_core.training.batching``),
into every checkpoint, and only rank 0 writes a checkpoint's files and reports to MLflow.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from flows import launch
from flows.launch import run_torchrun
from gist_core.config import load_settings
from gist_core.registry import client, tracking
from gist_core.stages import run_data_stage
from tests.support.projects import REPO, tiny_params

pytestmark = pytest.mark.slow


def test_torchrun_trains_with_two_processes_and_checkpoints_mid_run(
    tmp_path: Path, models_dir: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = tiny_params(models_dir, tmp_path)
    params["base"].update({"student": str(tiny_model_dir), "guide": str(tiny_model_dir)})
    params["data"]["max_per_task"] = 40
    for source in params["data"]["classification"]:
        source["path"] = str(REPO / source["path"])
    params["evaluate"]["data_dir"] = str(REPO / "data" / "raw")
    # The guide is the tiny model itself (same vocabulary), through the guide-embedding cache.
    # save_steps 2 of 3 steps: a checkpoint mid-run (step 2) and one at the end (step 3).
    params["train"].update(
        {
            "max_steps": 3,
            "batch_size": 4,
            "max_seq_length": 32,
            "save_steps": 2,
            "loss": "gist",
            "guide_cache": True,
        }
    )
    params["orchestration"] = {**params.get("orchestration", {}), "train_launcher": "torchrun", "nproc_per_node": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    settings = load_settings(tmp_path)
    run_data_stage(settings)
    run_id = tracking.start_run(settings, run_name="torchrun-test")

    launched: list[subprocess.CompletedProcess] = []
    real_run = subprocess.run

    def recording_run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        launched.append(real_run(*args, **kwargs))
        return launched[-1]

    monkeypatch.setattr(launch.subprocess, "run", recording_run)
    metrics = run_torchrun(settings, run_id, {"train.logging_steps": 1})

    assert metrics["world_size"] == 2 and metrics["steps"] == 3, metrics
    assert metrics["gather_across_devices"] is True, "in-batch candidates come from both processes"
    assert (metrics["guide"], metrics["loss"], metrics["examples"]) == ("cache", "GISTEmbedLoss", 3 * 4 * 2)
    assert (settings.path(settings.train.guide_cache_dir) / "manifest.json").is_file(), "rank 0 built the cache"
    (torchrun,) = [p for p in launched if "torch.distributed.run" in p.args]
    # One "Saving model checkpoint" log line per checkpoint: rank 0's (every rank used to write the files).
    saved = [line for line in torchrun.stderr.splitlines() if "Saving model checkpoint to" in line]
    assert [Path(line.split()[-1]).name for line in saved] == ["checkpoint-2", "checkpoint-3"], torchrun.stderr[-3000:]
    (run_dir,) = settings.path(settings.train.checkpoints_dir).iterdir()
    assert run_dir.name == metrics["key"] and [p.name for p in run_dir.iterdir()] == ["model"], (
        "checkpoints removed after the final save; the finished model kept for reuse"
    )
    assert (settings.path(settings.train.output_dir) / "model.safetensors").is_file()
    mlc = client.client(settings)
    run = mlc.get_run(run_id)
    assert run.data.params["train.logging_steps"] == "1", "the flow's overrides reached every rank"
    experiment = mlc.get_experiment_by_name(settings.registry.experiment)
    assert len(mlc.search_runs([experiment.experiment_id])) == 1, "no rank starts a run of its own"
    assert [m.step for m in mlc.get_metric_history(run_id, "train/loss")] == [1, 2, 3], "rank 0 alone logs"
    masked = mlc.get_metric_history(run_id, "train/guide_masked_fraction")
    assert len(masked) == 3 and all(0.0 <= m.value <= 1.0 for m in masked)
    assert torchrun.stdout.count("trained 3 steps") == 1, "only rank 0 reports"
