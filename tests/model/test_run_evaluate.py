"""stages.run_evaluate end to end with tiny random models: base, champion and candidate on custom tasks.

Checks the contract with the registry and the flow (EvalOutput's fields), the files it writes
(reports/eval.json, .md, _deltas.png), what it logs to MLflow, and that a second run serves the
base model and the champion from the result cache without encoding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from gist_core.config import Settings, settings_from_dict
from gist_core.registry import client
from tests.support.custom_tasks import CUSTOM_TASKS, NAMES, write_files

pytestmark = pytest.mark.slow


def perturbed_copy(source: Path, target: Path, seed: int) -> Path:
    """The same architecture with slightly different weights: another model, another content hash."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(source), device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.save(str(target))
    return target


@pytest.fixture(scope="module")
def project(tiny_model_dir: Path, repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("eval-project")
    write_files(root)
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["base"]["student"] = str(tiny_model_dir)
    raw["evaluate"].update({"tasks": NAMES, "custom_tasks": CUSTOM_TASKS, "progress_bar": False})
    raw["registry"].update({"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_location": "mlartifacts"})
    raw["gate"]["required_tasks"] = []
    settings = settings_from_dict(raw, root)
    return {
        "settings": settings,
        "root": root,
        "champion": perturbed_copy(tiny_model_dir, root / "champion", seed=1),
        "candidate": perturbed_copy(tiny_model_dir, root / "candidate", seed=2),
    }


@pytest.fixture(scope="module")
def first(project: dict[str, Any]) -> dict[str, Any]:
    from gist_core.registry import tracking
    from gist_core.stages import run_evaluate

    settings: Settings = project["settings"]
    run_id = tracking.start_run(settings, "evaluate-test")
    out = run_evaluate(settings, project["candidate"], run_id, champion_dir=project["champion"])
    return {"out": out, "run_id": run_id}


def test_eval_output_keeps_old_fields_and_adds_baselines(first: dict[str, Any]) -> None:
    out = first["out"]
    assert list(out.candidate) == NAMES
    assert out.baseline_name == "base"
    assert out.baseline == out.baselines["base"]  # callers of the old fields see the base model
    assert list(out.baselines) == ["base", "champion"]
    assert set(out.baselines["champion"]) == set(NAMES)
    assert out.baselines["champion"] != out.baselines["base"]
    assert out.categories == {"MyIntentClassification": "Classification", "MySTS": "STS", "MyRetrieval": "Retrieval"}
    assert set(out.task_revisions) == set(NAMES)
    assert out.models["base"]["name"] == out.models["champion"]["name"] == "gist-local/model"
    assert len({m["revision"] for m in out.models.values()}) == 3  # three different weights
    assert all(m["revision"].startswith(m["fingerprint"] + "-") for m in out.models.values())
    assert out.eval_settings["precision"] == "float32" and "torch==" in out.eval_settings["libraries"]
    assert out.summary["baselines"] == ["base", "champion"]
    delta = out.summary["tasks"]["MySTS"]["deltas"]["champion"]
    assert delta == pytest.approx(out.candidate["MySTS"] - out.baselines["champion"]["MySTS"])


def test_reports_are_written(first: dict[str, Any], project: dict[str, Any]) -> None:
    from gist_core.stages import EvalOutput, eval_report_paths

    paths = eval_report_paths(project["settings"])
    assert paths["json"] == project["root"] / "reports/eval.json"
    assert EvalOutput.read(paths["json"]) == first["out"]
    table = paths["markdown"].read_text()
    assert "| task | type | main score | candidate | base | Δ base | champion | Δ champion |" in table
    assert all(f"| {name} |" in table for name in NAMES)
    assert paths["chart"].read_bytes()[:4] == b"\x89PNG"


def test_mlflow_gets_metrics_and_artifacts(first: dict[str, Any], project: dict[str, Any]) -> None:
    mlc = client.client(project["settings"])
    metrics = mlc.get_run(first["run_id"]).data.metrics
    out = first["out"]
    assert metrics["eval/MySTS"] == pytest.approx(out.candidate["MySTS"])
    assert metrics["champion/MySTS"] == pytest.approx(out.baselines["champion"]["MySTS"])
    assert metrics["delta/MySTS"] == pytest.approx(out.candidate["MySTS"] - out.baseline["MySTS"])
    assert metrics["delta_champion/category/Retrieval"] == pytest.approx(
        out.candidate["MyRetrieval"] - out.baselines["champion"]["MyRetrieval"]
    )
    for key in ("eval/overall", "base/overall_by_category", "delta/category/STS", "delta_champion/overall"):
        assert key in metrics, key
    artifacts = {f.path for f in mlc.list_artifacts(first["run_id"], "evaluation")}
    assert artifacts == {"evaluation/summary.json", "evaluation/summary.md", "evaluation/deltas.png"}
    local = Path(mlc.download_artifacts(first["run_id"], "evaluation/summary.json"))
    assert json.loads(local.read_text()) == out.summary


def test_second_run_reuses_base_and_champion(
    first: dict[str, Any], project: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gist_core.evaluation.encoding import DedupEncoder
    from gist_core.stages import run_evaluate

    def no_encoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("encoded although every result is cached")

    monkeypatch.setattr(DedupEncoder, "encode", no_encoding)
    # the champion downloaded again to another folder: same content, same results
    champion = shutil.copytree(project["champion"], project["root"] / "champion-again")
    again = run_evaluate(project["settings"], project["candidate"], None, champion_dir=champion)
    assert again.baselines == first["out"].baselines
    assert again.candidate == first["out"].candidate


def test_missing_champion_folder_is_named(project: dict[str, Any]) -> None:
    from gist_core.errors import EvaluationError
    from gist_core.stages import run_evaluate

    with pytest.raises(EvaluationError, match="champion model folder not found"):
        run_evaluate(project["settings"], project["candidate"], None, champion_dir=project["root"] / "nope")
