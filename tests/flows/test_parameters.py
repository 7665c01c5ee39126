"""Flow parameters: validation a UI run gets, and their mapping onto params.yaml's dotted keys."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.parameters import PipelineParameters, apply_parameters, showing_current_values
from gist_core.config import OrchestrationSettings, load_settings
from gist_core.errors import ConfigError
from tests.support.projects import REPO


@pytest.fixture(scope="module")
def settings():
    return load_settings(REPO)


def test_typed_fields_map_to_dotted_keys(settings) -> None:
    params = PipelineParameters(
        student="all-MiniLM-L6-v2",
        guide="all-MiniLM-L6-v2",
        max_per_task=50,
        max_steps=7,
        batch_size=8,
        learning_rate=5e-6,
        gate_mode="dry_run",
        overrides={"train.warmup_ratio": 0.05},
    )
    assert params.to_overrides(settings) == {
        "base.student": "all-MiniLM-L6-v2",
        "base.guide": "all-MiniLM-L6-v2",
        "data.max_per_task": 50,
        "train.max_steps": 7,
        "train.batch_size": 8,
        "train.learning_rate": 5e-6,
        "gate.mode": "dry_run",
        "train.warmup_ratio": 0.05,
    }
    run_settings, _ = apply_parameters(settings, params)
    assert (run_settings.train.max_steps, run_settings.gate.mode, run_settings.train.warmup_ratio) == (
        7,
        "dry_run",
        0.05,
    )
    assert run_settings.root == settings.root


def test_epochs_replace_max_steps(settings) -> None:
    params = PipelineParameters.model_validate({"epochs": 1.5, "gate_mode": "dry_run"})  # what the UI sends
    assert params.to_overrides(settings) == {
        "train.num_train_epochs": 1.5,
        "train.max_steps": None,
        "gate.mode": "dry_run",
    }
    run_settings, _ = apply_parameters(settings, params)
    assert (run_settings.train.num_train_epochs, run_settings.train.max_steps) == (1.5, None)
    # ...and back: max_steps from the UI clears epochs set in params.yaml.
    run_settings, dotted = apply_parameters(run_settings, PipelineParameters(max_steps=4))
    assert dotted == {"train.max_steps": 4, "train.num_train_epochs": None}
    assert (run_settings.train.num_train_epochs, run_settings.train.max_steps) == (None, 4)


def test_no_parameters_keep_params_yaml(settings) -> None:
    assert apply_parameters(settings, None) == (settings, {})
    assert apply_parameters(settings, PipelineParameters()) == (settings, {})


def test_data_sources_select_configured_entries_in_order(settings) -> None:
    run_settings, dotted = apply_parameters(
        settings, PipelineParameters(data_sources=["EmotionClassification", "Banking77Classification"])
    )
    assert [s.name for s in run_settings.data.classification] == ["EmotionClassification", "Banking77Classification"]
    assert run_settings.data.classification[0] == settings.data.classification[1]
    assert dotted["data.classification"][0]["format"] == "lastsep"


def test_unknown_data_source_names_the_known_ones(settings) -> None:
    with pytest.raises(ConfigError, match=r"data_sources: unknown \['MEDI'\].*Banking77Classification"):
        PipelineParameters(data_sources=["MEDI"]).to_overrides(settings)


def test_narrowing_tasks_narrows_the_required_tasks(settings) -> None:
    run_settings, _ = apply_parameters(settings, PipelineParameters(tasks=["STSBenchmark"]))
    assert run_settings.evaluate.tasks == ["STSBenchmark"]
    assert run_settings.gate.required_tasks == ["STSBenchmark"]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"max_steps": 0}, "max_steps"),
        ({"batch_size": 1}, "batch_size"),
        ({"learning_rate": 2.0}, "learning_rate"),
        ({"gate_mode": "yolo"}, "gate_mode"),
        ({"student": ""}, "student"),
        ({"tasks": []}, "tasks"),
        ({"tasks": ["STSBenchmark", "STSBenchmark"]}, "duplicate"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": -1}, "epochs"),
        ({"max_steps": 5, "epochs": 2}, "not both"),
        ({"num_train_epochs": 3}, "num_train_epochs"),
        ({"overrides": {"max_steps": 3}}, "dotted"),
    ],
)
def test_invalid_values_are_rejected_with_the_field_named(raw: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        PipelineParameters.model_validate(raw)


def test_settings_level_errors_surface_as_config_errors(settings) -> None:
    with pytest.raises(ConfigError, match="train.nope"):
        apply_parameters(settings, PipelineParameters(overrides={"train.nope": 1}))
    with pytest.raises(ConfigError, match=r"unknown tasks \[.NoSuchTask.\]"):
        apply_parameters(settings, PipelineParameters(tasks=["NoSuchTask"]))


def test_json_schema_lets_the_server_reject_bad_runs_and_reads_as_a_form() -> None:
    schema = PipelineParameters.model_json_schema()
    assert schema["additionalProperties"] is False
    fields = schema["properties"]
    assert not [name for name, field in fields.items() if "anyOf" in field], "no null toggles in the form"
    assert fields["max_steps"]["minimum"] == 1 and fields["max_steps"]["type"] == "integer"
    assert "default" not in fields["max_steps"], "an empty field is not sent: params.yaml applies"
    assert fields["epochs"]["exclusiveMinimum"] == 0 and fields["epochs"]["type"] == "number"
    assert fields["gate_mode"]["enum"] == ["enabled", "dry_run", "disabled"]
    assert fields["tasks"]["type"] == "array" and fields["tasks"]["minItems"] == 1
    # unset fields never reach a run's parameters (the form pre-fills from this default)
    assert PipelineParameters().model_dump(mode="json") == {"update_checkout": False, "overrides": {}}
    assert PipelineParameters(max_steps=5).model_dump(mode="json")["max_steps"] == 5


def test_the_form_shows_the_values_params_yaml_gives(settings) -> None:
    with showing_current_values(PipelineParameters.current_values(settings)):
        fields = PipelineParameters.model_json_schema()["properties"]
    assert fields["max_steps"]["description"].endswith(f"(params.yaml: {settings.train.max_steps})")
    assert fields["gate_mode"]["description"].endswith("(params.yaml: enabled)")
    assert "params.yaml" not in PipelineParameters.model_json_schema()["properties"]["max_steps"]["description"]


def test_orchestration_settings_validate() -> None:
    assert OrchestrationSettings(nproc_per_node=4).nproc_per_node == 4
    for bad, message in [
        ({"nproc_per_node": 0}, "at least 1"),
        ({"nproc_per_node": "many"}, "nproc_per_node"),
        ({"train_launcher": "mpirun"}, "train_launcher"),
        ({"schedule_cron": "weekly"}, "5 cron fields"),
        ({"schedule_timezone": "Mars/Olympus"}, "IANA"),
    ]:
        with pytest.raises(ValidationError, match=message):
            OrchestrationSettings.model_validate(bad)
