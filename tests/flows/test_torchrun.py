"""The flow's torchrun launcher, for real: two CPU processes (gloo) train a tiny random BERT.

What the fine-tune task runs with ``orchestration.train_launcher: torchrun``: the command from
``flows.launch.torchrun_command`` in a subprocess, then the checkpoint's train_metrics.json.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.launch import run_torchrun
from gist_core import registry
from gist_core.config import load_settings
from gist_core.stages import run_data_stage
from tests.conftest import REPO, tiny_params

pytestmark = pytest.mark.slow


def test_torchrun_trains_with_two_processes(tmp_path: Path, models_dir: Path, tiny_model_dir: Path) -> None:
    params = tiny_params(models_dir, tmp_path)
    params["base"].update({"student": str(tiny_model_dir), "guide": str(tiny_model_dir)})
    params["data"]["max_per_task"] = 40
    for source in params["data"]["classification"]:
        source["path"] = str(REPO / source["path"])
    params["evaluate"]["data_dir"] = str(REPO / "data" / "raw")
    # save_steps: null -- a mid-run checkpoint under DDP currently fails to pickle the batch sampler
    # factory (gist_core.batching); reported to the training owner.
    # The launcher is under test, not the loss: no guide, so each rank only loads the student.
    params["train"].update(
        {
            "max_steps": 2,
            "batch_size": 4,
            "max_seq_length": 32,
            "save_steps": None,
            "loss": "mnrl",
            "guide_cache": False,
        }
    )
    params["orchestration"] = {**params.get("orchestration", {}), "train_launcher": "torchrun", "nproc_per_node": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    settings = load_settings(tmp_path)
    run_data_stage(settings)
    run_id = registry.start_run(settings, run_name="torchrun-test")

    metrics = run_torchrun(settings, run_id, {"train.logging_steps": 1})

    assert metrics["world_size"] == 2 and metrics["steps"] == 2, metrics
    assert (settings.path(settings.train.output_dir) / "model.safetensors").is_file()
    run = registry.client(settings).get_run(run_id)
    assert run.data.params["train.logging_steps"] == "1", "the flow's overrides reached every rank"
    assert "train/loss" in run.data.metrics, "rank 0 logged the loss curve"
