"""Test projects: a real git + DVC repository holding the pipeline, and running `gist` in it as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def cli_env(tmp: Path) -> dict[str, str]:
    """The environment for running `gist` as a user would: its own Prefect home, the venv's scripts
    on PATH (stage commands exec `gist`, `mlflow models serve` execs uvicorn), MLflow from params.yaml."""
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(tmp / "prefect-home")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def tiny_params(models_dir: Path, tmp: Path) -> dict:
    """params.yaml of the repo, shrunk to a few hundred triplets and a few steps."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"]["models_dir"] = str(models_dir)
    params["base"]["guide"] = "all-MiniLM-L6-v2"  # same vocabulary: no re-tokenising, fast
    params["data"]["max_per_task"] = 100
    params["data"]["mining"]["max_texts_per_task"] = 300  # guide-mine a few hundred texts per task
    params["train"].update({"max_steps": 3, "batch_size": 16, "logging_steps": 1})
    params["evaluate"].update({"tasks": ["STSBenchmark"], "cache_dir": str(tmp / "mteb-cache")})
    params["gate"]["required_tasks"] = ["STSBenchmark"]
    return params


def make_project(path: Path, params: dict) -> Path:
    """A real git + DVC project holding the pipeline's dvc.yaml, data and params, with a local remote."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", path / "dvc.yaml")
    for package in ("gist_core", "flows"):  # the code the stages run and the flows a work pool loads
        shutil.copytree(REPO / package, path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "infra", path / "infra")
    for sub in ("classification", "sts"):
        shutil.copytree(REPO / "data" / "raw" / sub, path / "data" / "raw" / sub)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / ".gitignore", path / ".gitignore")
    run(["git", "init", "-q"], path)
    run(["git", "config", "user.email", "test@example.com"], path)
    run(["git", "config", "user.name", "test"], path)
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "init", "-q"], path)
    shutil.copy(REPO / ".dvcignore", path / ".dvcignore")  # byte code beside the code deps is not data
    run([*dvc, "config", "core.analytics", "false"], path)
    run([*dvc, "remote", "add", "-d", "local", str(path.parent / (path.name + "-remote"))], path)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "project"], path)
    return path
