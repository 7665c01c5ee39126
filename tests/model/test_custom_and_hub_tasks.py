"""Custom tasks from params.yaml (STS, Classification, Retrieval) and Hub tasks by name, with the tiny random model.

The files are small and written here; the model's scores are noise, so the tests check the
plumbing: the tasks load, mteb scores them, the results are cached under the task's content
revision, and a Hub task that cannot be downloaded fails with a message that points offline
users at the local pack.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from gist_core.catalogue import LOCAL_TASKS
from gist_core.config import EvaluateSettings
from gist_core.errors import EvaluationError
from gist_core.evaluation.tasks import build_tasks, hub_tasks, task_source
from tests.support.custom_tasks import CUSTOM_TASKS, NAMES, write_files

pytestmark = pytest.mark.slow


def settings(**changes: Any) -> EvaluateSettings:
    custom = [dict(t) for t in CUSTOM_TASKS]
    for t in custom:
        t.update(changes.get(t["name"], {}))
    return EvaluateSettings(tasks=["STSBenchmark", *NAMES], custom_tasks=custom)


def build(root: Path, cfg: EvaluateSettings | None = None) -> list[Any]:
    cfg = cfg or settings()
    return build_tasks(cfg.tasks[1:], custom_tasks=cfg.custom_tasks, root=root)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    write_files(root)
    return root


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_model_dir), device="cpu")


def test_custom_tasks_have_full_metadata(files: Path) -> None:
    intent, sts, retrieval = build(files)

    assert [t.metadata.type for t in (intent, sts, retrieval)] == ["Classification", "STS", "Retrieval"]
    assert [t.metadata.main_score for t in (intent, sts, retrieval)] == ["accuracy", "cosine_spearman", "ndcg_at_10"]
    assert [task_source(t) for t in (intent, sts, retrieval)] == ["custom"] * 3
    assert sts.metadata.dataset["path"] == "custom/MySTS"
    assert len(sts.metadata.revision) == 40
    assert (sts.metadata.license, sts.metadata.bibtex_citation) == ("cc-by-4.0", "@misc{mine}")
    assert sts.metadata.eval_langs == ["eng-Latn"] and sts.metadata.eval_splits == ["test"]
    assert (intent.samples_per_label, intent.n_experiments) == (4, 3)
    assert (sts.min_score, sts.max_score) == (0.0, 5.0)


def test_custom_tasks_load_in_mteb_shapes(files: Path) -> None:
    intent, sts, retrieval = build(files)
    for task in (intent, sts, retrieval):
        task.load_data()

    train = intent.dataset["default"]["train"]
    assert len(train) == 24 and train.features["label"].names == ["card", "pin"]
    assert sts.dataset["default"]["test"][0] == {
        "sentence1": "a man plays guitar",
        "sentence2": "a person plays an instrument",
        "score": 4.2,
    }
    split = retrieval.dataset["default"]["test"]
    assert (len(split["corpus"]), len(split["queries"]), split["relevant_docs"]["q3"]) == (30, 8, {"d3": 1})


def test_custom_tasks_score_and_are_cached(files: Path, tiny: Any, tmp_path: Path) -> None:
    from gist_core.evaluation.evaluate import evaluate_model

    def run() -> dict[str, Any]:
        return evaluate_model(
            tiny,
            model_name="gist-test/tiny",
            model_revision="tiny",
            tasks=build(files),
            cache_dir=tmp_path / "cache",
            show_progress_bar=False,
        )

    first = run()
    assert list(first) == NAMES
    assert [s.category for s in first.values()] == ["Classification", "STS", "Retrieval"]
    for score in first.values():
        assert -1.0 <= score.main_score <= 1.0
        assert score.encoding is not None and score.encoding["encoded"] > 0
    again = run()
    assert again == first
    assert all(s.encoding is None for s in again.values())  # served from the cache


def test_custom_revision_follows_content_and_settings_not_location(files: Path, tmp_path: Path) -> None:
    revision = {t.metadata.name: t.metadata.revision for t in build(files)}

    moved = tmp_path / "elsewhere"
    shutil.copytree(files, moved)
    assert {t.metadata.name: t.metadata.revision for t in build(moved)} == revision
    # descriptive fields keep the revision (and cached results)
    described = settings(MySTS={"description": "mine", "license": "mit"})
    assert build(files, described)[1].metadata.revision == revision["MySTS"]
    # a setting that changes the score changes it
    assert build(files, settings(MySTS={"max_score": 4.0}))[1].metadata.revision != revision["MySTS"]
    assert build(files, settings(MySTS={"main_score": "cosine_pearson"}))[1].metadata.revision != revision["MySTS"]
    assert (
        build(files, settings(MyIntentClassification={"n_experiments": 5}))[0].metadata.revision
        != revision["MyIntentClassification"]
    )
    # and so does an edited file
    with (files / "ret/qrels.tsv").open("a") as fh:
        fh.write("q0\td5\t1\n")
    assert build(files)[2].metadata.revision != revision["MyRetrieval"]


def test_custom_task_errors_name_the_task_and_file(files: Path) -> None:
    (files / "sts.jsonl").unlink()
    with pytest.raises(EvaluationError, match=r"task MySTS: data file not found: .*sts\.jsonl \(test\)"):
        build(files)
    with pytest.raises(EvaluationError, match="custom task MySTS: invalid task metadata: license"):
        write_files(files.parent / "again")
        build(files.parent / "again", settings(MySTS={"license": "my own"}))

    intent = build(files.parent / "again", settings(MyIntentClassification={"label_column": "label"}))[0]
    with pytest.raises(EvaluationError, match=r"MyIntentClassification \(train\): .*missing column\(s\) \['label'\]"):
        intent.load_data()


# ---------------------------------------------------------------- Hub tasks


def test_hub_names_resolve_to_mtebs_tasks_without_network() -> None:
    (sts12,) = hub_tasks("mteb:STS12")
    assert sts12.metadata.name == "STS12" and task_source(sts12) == "hub"
    benchmark = hub_tasks("mteb:MTEB(eng, v2)")
    assert len(benchmark) > 20 and "STSBenchmark" in {t.metadata.name for t in benchmark}
    with pytest.raises(EvaluationError, match="'mteb:NoSuchTask': not an mteb task or benchmark name"):
        hub_tasks("mteb:NoSuchTask")
    # a local task and its Hub version in one list: the same task name twice
    with pytest.raises(EvaluationError, match=r"duplicate task names: \['STSBenchmark'\]"):
        build_tasks(["STSBenchmark", "mteb:STSBenchmark"])


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No Hugging Face data cached (a developer's cache must not satisfy the download)."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hub_task_offline_is_a_clear_error(empty_hf_cache: None, tiny: Any, tmp_path: Path) -> None:
    from gist_core.evaluation.evaluate import evaluate_model

    tasks = build_tasks(["mteb:STSBenchmark"])
    with pytest.raises(EvaluationError) as err:
        evaluate_model(
            tiny,
            model_name="gist-test/tiny",
            model_revision="tiny",
            tasks=tasks,
            cache_dir=tmp_path / "cache",
            show_progress_bar=False,
        )
    message = str(err.value)
    assert message.startswith("task STSBenchmark (mteb:): could not load its data from the Hugging Face Hub")
    assert "mteb/stsbenchmark-sts@" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "use the local task pack in evaluate.tasks: " + ", ".join(LOCAL_TASKS) in message
    assert "use 'STSBenchmark' instead of 'mteb:STSBenchmark'" in message
    assert not tasks[0].data_loaded


def test_bfloat16_results_are_cached_apart(files: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from gist_core.evaluation import evaluate
    from gist_core.evaluation.evaluate import score_model
    from gist_core.models import ModelRef, model_fingerprint

    ref = ModelRef("tiny", "path", str(tiny_model_dir))
    tasks = build(files)[1:2]  # MySTS
    fp32 = score_model(ref, tasks, cache_dir=tmp_path, show_progress_bar=False)
    bf16 = score_model(ref, tasks, cache_dir=tmp_path, show_progress_bar=False, precision="bfloat16")

    assert bf16.revision == fp32.revision.replace("-lib", "-bf16-lib")
    assert bf16.fingerprint == fp32.fingerprint == model_fingerprint(ref) == fp32.revision.split("-")[0]
    assert (fp32.settings["precision"], bf16.settings["precision"]) == ("float32", "bfloat16")
    assert bf16.scores["MySTS"].encoding is not None  # not served from the float32 result
    assert -1.0 <= bf16.scores["MySTS"].main_score <= 1.0
    again = score_model(ref, tasks, cache_dir=tmp_path, show_progress_bar=False, precision="bfloat16")
    assert again.scores == bf16.scores and again.scores["MySTS"].encoding is None

    # a score cached under other sentence-transformers / transformers / torch versions is not reused
    libraries = fp32.settings["libraries"]
    assert libraries.startswith("sentence-transformers==") and " torch==" in libraries
    monkeypatch.setattr(evaluate, "runtime_libraries", lambda: libraries.replace("torch==", "torch==0.0+"))
    upgraded = score_model(ref, tasks, cache_dir=tmp_path, show_progress_bar=False)
    assert upgraded.revision != fp32.revision and upgraded.scores["MySTS"].encoding is not None
