"""Registry tests' shared pieces: settings on a copied MLflow SQLite store, a fake evaluation, distinct candidates."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import yaml

from gist_core import stages
from gist_core.config import settings_from_dict
from gist_core.registry import tracking
from gist_core.stages import EvalOutput
from gist_core.versioning import DataVersion

REVS = {"STSBenchmark": "rev-sts-1"}
DATA = DataVersion("data", "data/prepared/triplets.parquet", "d" * 32, None)
F32 = {"precision": "float32", "max_seq_length": "model", "libraries": "sentence-transformers==6.2.0"}


def make_settings(root: Path, repo_root: Path, **gate):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["registry"].update(
        {
            "tracking_uri": "sqlite:///store/mlflow.db",
            "artifact_location": "artifacts",
            "model_name": "gist-test",
            "retry_attempts": 2,
            "retry_backoff_seconds": 0.01,
            "lock_timeout_seconds": 30,
        }
    )
    raw["evaluate"]["tasks"] = ["STSBenchmark"]
    raw["gate"].update({"required_tasks": ["STSBenchmark"], "max_task_regression": 0.01, **gate})
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))  # for the CLI's --root
    return settings_from_dict(raw, root)


def evaluation(
    candidate: float,
    base: float = 0.70,
    revs: dict[str, str] = REVS,
    mteb: str = "2.26.24",
    eval_settings: dict[str, str] | None = None,
) -> EvalOutput:
    return EvalOutput(
        candidate={"STSBenchmark": candidate},
        baseline={"STSBenchmark": base},
        baseline_name="base",
        summary={"tasks": {"STSBenchmark": {"category": "STS"}}},
        task_revisions=dict(revs),
        mteb_version=mteb,
        path="reports/eval.json",
        baselines={"base": {"STSBenchmark": base}},
        categories={"STSBenchmark": "STS"},
        eval_settings=dict(eval_settings or {}),
    )


_VARIANTS = itertools.count(1)


def variant(model_dir: Path, root: Path) -> Path:
    """A copy of the model with another weights hash (an extra file), as a retrained candidate would have."""
    n = next(_VARIANTS)
    dest = root / f"candidate-{n}"
    shutil.copytree(model_dir, dest)
    (dest / "variant.txt").write_text(str(n))
    return dest


def register(settings, model_dir: Path, score: float, same_weights: bool = False, **kw):
    """Register from a new run; each call a new model unless ``same_weights``."""
    run_id = tracking.start_run(settings, "test")
    model = model_dir if same_weights else variant(model_dir, settings.root)
    with tracking.failing_run_marks_failed(settings, run_id):
        version, decision = stages.run_register(settings, run_id, model, evaluation(score, **kw), DATA)
    return run_id, version, decision
