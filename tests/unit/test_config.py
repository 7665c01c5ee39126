from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from gist_core.config import load_settings, settings_from_dict, with_overrides
from gist_core.errors import ConfigError


def _raw(repo_root: Path) -> dict:
    return yaml.safe_load((repo_root / "params.yaml").read_text())


def test_repo_params_are_valid(repo_root: Path) -> None:
    settings = load_settings(repo_root)
    assert settings.train.loss == "gist"
    assert settings.train.temperature == 0.01
    assert [s.name for s in settings.data.classification] == [
        "Banking77Classification",
        "EmotionClassification",
        "TweetSentimentExtractionClassification",
    ]
    assert settings.path("data/raw") == repo_root / "data/raw"


def test_unknown_key_is_named(repo_root: Path, tmp_path: Path) -> None:
    raw = _raw(repo_root)
    raw["train"]["batch_szie"] = 8
    with pytest.raises(ConfigError, match=r"train\.batch_szie: Extra inputs are not permitted"):
        settings_from_dict(raw, tmp_path)


def test_bad_value_names_file_and_key(repo_root: Path, tmp_path: Path) -> None:
    raw = _raw(repo_root)
    raw["train"]["batch_size"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_settings(tmp_path)
    assert str(tmp_path / "params.yaml") in str(err.value)
    assert "train.batch_size" in str(err.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_settings(tmp_path)
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(tmp_path)
    (tmp_path / "params.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_settings(tmp_path)


def test_required_tasks_must_be_evaluated(repo_root: Path, tmp_path: Path) -> None:
    raw = _raw(repo_root)
    raw["gate"]["required_tasks"] = ["SciFact"]
    with pytest.raises(ConfigError, match="SciFact"):
        settings_from_dict(raw, tmp_path)


def test_overrides_are_validated(repo_root: Path) -> None:
    settings = load_settings(repo_root)
    changed = with_overrides(settings, {"train.max_steps": 7, "gate.mode": "dry_run"})
    assert (changed.train.max_steps, changed.gate.mode) == (7, "dry_run")
    assert settings.train.max_steps != 7 or settings.gate.mode != "dry_run"
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        with_overrides(settings, {"train.nope": 1})
    with pytest.raises(ConfigError, match="gate.mode"):
        with_overrides(settings, {"gate.mode": "yolo"})


def test_training_length_is_steps_or_epochs(repo_root: Path, tmp_path: Path) -> None:
    raw = _raw(repo_root)
    raw["train"].update({"max_steps": None, "num_train_epochs": 2.5})
    settings = settings_from_dict(raw, tmp_path)
    assert (settings.train.max_steps, settings.train.num_train_epochs) == (None, 2.5)
    assert settings.train.length_description == "2.5 epochs"
    assert load_settings(repo_root).train.length_description == "30 steps"

    for both_or_neither, given in [
        ({"max_steps": 30, "num_train_epochs": 1}, "both are set"),
        ({"max_steps": None}, "neither is set"),
    ]:
        raw = _raw(repo_root)
        raw["train"].update(both_or_neither)
        with pytest.raises(ConfigError, match=rf"train\.max_steps and train\.num_train_epochs.*\({given}\)"):
            settings_from_dict(raw, tmp_path)
    raw = _raw(repo_root)
    raw["train"].update({"max_steps": None, "num_train_epochs": 0})
    with pytest.raises(ConfigError, match=r"train\.num_train_epochs: Input should be greater than 0"):
        settings_from_dict(raw, tmp_path)
    # An override switches to epochs by clearing max_steps in the same call.
    changed = with_overrides(load_settings(repo_root), {"train.max_steps": None, "train.num_train_epochs": 1})
    assert (changed.train.max_steps, changed.train.num_train_epochs) == (None, 1.0)


def test_tracking_uri_is_absolute_and_env_wins(repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(repo_root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert settings.tracking_uri == f"sqlite:///{repo_root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert settings.tracking_uri == "http://127.0.0.1:5000"


def test_stage_params_are_flat(repo_root: Path) -> None:
    params = load_settings(repo_root).stage_params("base", "train")
    assert params["train.temperature"] == 0.01
    assert params["base.student"] == "all-MiniLM-L6-v2"
    assert all("." in k for k in params)


def _default_mismatches(model: BaseModel, where: str) -> list[str]:
    """Fields of ``model`` (as read from params.yaml) whose config.py default differs from it."""
    out = []
    dumped = model.model_dump(mode="json")
    for name, info in type(model).model_fields.items():
        if info.is_required() or info.exclude:
            continue
        default = info.get_default(call_default_factory=True)
        value = getattr(model, name)
        if isinstance(value, BaseModel) and isinstance(default, BaseModel):
            out += _default_mismatches(value, f"{where}.{name}")
            continue
        if to_jsonable_python(default) != dumped[name]:
            out.append(f"{where}.{name}: config.py {to_jsonable_python(default)!r}, params.yaml {dumped[name]!r}")
    return out


def test_config_defaults_are_the_values_of_params_yaml(repo_root: Path) -> None:
    """params.yaml is the single source of defaults: every config.py default equals it (or the field is required)."""
    settings = load_settings(repo_root)
    assert _default_mismatches(settings, "params") == []
