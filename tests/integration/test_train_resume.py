"""A training process killed after a checkpoint resumes when started again and ends where an uninterrupted run ends.

Real subprocesses on a tiny random BERT: one run goes straight through; another is SIGKILLed right
after it wrote its step-4 checkpoint, then started again with the same settings and data.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.triplets import write_triplets

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MAX_STEPS, SAVE_STEPS, KILL_AFTER = 6, 2, 4

SCRIPT = """
import json, sys, time
from pathlib import Path
from transformers import TrainerCallback
from gist_core.config import load_settings
from gist_core.training.trainer import train

root, pause_at = Path(sys.argv[1]), int(sys.argv[2])

class PauseAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == pause_at:
            (root / "checkpoint-written").write_text(str(state.global_step))
            time.sleep(600)  # the test kills the process here

settings = load_settings(root)
result = train(settings, settings.path(settings.data.output), callbacks=[PauseAfterSave()])
print("RESULT " + json.dumps(result.to_dict()))
"""


def _project(path: Path, repo_root: Path, model: Path, triplets: Path) -> Path:
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["base"].update({"student": str(model), "guide": str(model)})
    params["train"].update(
        {"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "batch_size": 8, "logging_steps": 1, "learning_rate": 1e-3}
    )
    path.mkdir(parents=True)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (path / "data/prepared").mkdir(parents=True)
    shutil.copy(triplets, path / "data/prepared/triplets.parquet")
    (path / "train_script.py").write_text(SCRIPT)
    return path


def _env(repo_root: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(repo_root) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(project: Path, repo_root: Path, pause_at: int = 0) -> dict:
    proc = subprocess.run(
        [sys.executable, "train_script.py", str(project), str(pause_at)],
        cwd=project,
        capture_output=True,
        text=True,
        env=_env(repo_root),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(next(folder.rglob("model.safetensors"))))


def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(
    repo_root: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    import torch

    triplets = write_triplets(repo_root, tmp_path / "triplets.parquet", per_task=30, seed=7)
    straight = _project(tmp_path / "straight", repo_root, tiny_model_dir, triplets)
    killed = _project(tmp_path / "killed", repo_root, tiny_model_dir, triplets)

    expected = _run(straight, repo_root)
    assert expected["steps"] == MAX_STEPS and expected["resumed_from"] is None

    proc = subprocess.Popen(
        [sys.executable, "train_script.py", str(killed), str(KILL_AFTER)],
        cwd=killed,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(repo_root),
    )
    try:
        deadline = time.monotonic() + 300
        while not (killed / "checkpoint-written").exists():
            assert proc.poll() is None, f"training ended before its checkpoint: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (killed / "outputs/candidate").exists()
    (run_dir,) = (killed / "outputs/checkpoints").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    (run_dir / "checkpoint-5").mkdir()  # as if a later save had been cut short: incomplete, to be ignored

    resumed = _run(killed, repo_root)
    assert resumed["resumed_from"] == str(run_dir / "checkpoint-4") and resumed["steps"] == MAX_STEPS
    assert sorted(p.name for p in run_dir.iterdir()) == ["model"], "checkpoints removed once the final model is saved"

    def losses(result: dict) -> list[tuple[int, float]]:
        return [(int(e["step"]), e["loss"]) for e in result["history"] if "loss" in e]

    assert [step for step, _ in losses(resumed)] == list(range(1, MAX_STEPS + 1))
    for (step, loss), (_, want) in zip(losses(resumed), losses(expected), strict=True):
        assert loss == pytest.approx(want, rel=1e-6, abs=1e-7), f"step {step}"
    assert resumed["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-6)
    final, want = _weights(killed / "outputs/candidate"), _weights(straight / "outputs/candidate")
    assert final.keys() == want.keys()
    assert all(torch.allclose(final[k], want[k], rtol=0, atol=1e-6) for k in want)
    initial = _weights(tiny_model_dir)
    assert any(not torch.equal(want[k], initial[k]) for k in want), "training moved the weights"
