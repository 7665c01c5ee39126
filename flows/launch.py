"""Scale-out for training: the command that runs ``gist train`` under torchrun on a multi-GPU worker.

With ``orchestration.train_launcher: torchrun`` the fine-tune task does not train in its own process;
it starts ``torchrun --standalone --nproc_per_node N -m gist_core train`` and reads the checkpoint's
``train_metrics.json`` afterwards. The run's settings reach every rank as ``--set`` overrides (JSON
values, which the CLI parses as YAML), so each process sees exactly the flow's settings.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from gist_core.config import Settings
from gist_core.training.trainer import TRAIN_METRICS_FILE

log = logging.getLogger(__name__)


def torchrun_command(settings: Settings, run_id: str, overrides: dict[str, Any] | None = None) -> list[str]:
    """``python -m torch.distributed.run ... -m gist_core train --root R --run-id ID --set k=v ...``."""
    cfg = settings.orchestration
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # what the `torchrun` script runs, with this interpreter
        "--standalone",
        f"--nproc_per_node={cfg.nproc_per_node}",
        "-m",
        "gist_core",
        "train",
        "--root",
        str(settings.root),
        "--run-id",
        run_id,
    ]
    for key, value in sorted((overrides or {}).items()):
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    return cmd


def run_torchrun(settings: Settings, run_id: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run training under torchrun and return the checkpoint's train metrics (``TrainResult.to_dict``)."""
    cmd = torchrun_command(settings, run_id, overrides)
    log.info("launching %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=settings.root, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"torchrun training exited with status {proc.returncode}:\n{tail}")
    metrics = Path(settings.path(settings.train.output_dir)) / TRAIN_METRICS_FILE
    if not metrics.is_file():
        raise RuntimeError(f"torchrun training finished but wrote no {metrics}")
    return json.loads(metrics.read_text())
