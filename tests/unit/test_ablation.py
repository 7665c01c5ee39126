"""The ablation's pure parts: noise injection, planning, verdicts, the summary, report and chart, settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flows.ablation import AblationParameters, apply_ablation_parameters
from gist_core.ablation.noise import inject_noise, subset_per_task
from gist_core.ablation.plan import RunRecord, plan
from gist_core.ablation.report import summarize, summary_markdown, verdict, write_report
from gist_core.config import settings_from_dict
from gist_core.errors import ConfigError, DataError


def _frame(rows_per_label: int = 6) -> pd.DataFrame:
    rows = []
    for task, labels in {"TaskA": ["x", "y", "z"], "TaskB": ["p", "q"]}.items():
        for label in labels:
            others = [other for other in labels if other != label]
            for i in range(rows_per_label):
                rows.append(
                    {
                        "anchor": f"{task} {label} anchor {i}",
                        "positive": f"{task} {label} positive {i}",
                        "negative": f"{task} {others[i % len(others)]} negative {i}",
                        "task_name": task,
                        "anchor_label": label,
                        "positive_label": label,
                        "negative_label": others[i % len(others)],
                        "guide_pos_sim": 0.9,
                        "guide_neg_sim": 0.1,
                    }
                )
    return pd.DataFrame(rows)


def _settings(repo_root: Path, tmp: Path, **ablation) -> object:
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw.setdefault("ablation", {}).update(ablation)
    return settings_from_dict(raw, tmp)


def test_noise_corrupts_the_asked_fraction_the_way_mined_data_goes_wrong() -> None:
    frame = _frame()
    noisy, corrupted, report = inject_noise(frame, 0.4, seed=3, positive_share=0.5)
    assert len(noisy) == len(frame) == report.rows
    assert report.corrupted_positive + report.corrupted_negative == round(0.4 * len(frame)) == len(corrupted)
    assert report.corrupted_positive == round(len(corrupted) * 0.5) and report.no_replacement == 0
    for row in corrupted.itertuples():
        now = noisy.loc[row.row]
        assert now[row.kind] == row.now != row.was and now["noise"] == row.kind
        assert np.isnan(now["guide_pos_sim"]) and np.isnan(now["guide_neg_sim"])
        assert now[f"{row.kind}_label"] == row.now_label
        if row.kind == "positive":  # an unrelated text: another label of the same task
            assert now["positive_label"] != now["anchor_label"] and now["positive"].startswith(now["task_name"])
        else:  # a false negative: the anchor's own label, neither the anchor nor its positive
            assert now["negative_label"] == now["anchor_label"]
            assert now["negative"] not in (now["anchor"], now["positive"]) and now["negative"].startswith(
                now["task_name"]
            )
    untouched = noisy["noise"] == ""
    pd.testing.assert_frame_equal(
        noisy.loc[untouched, frame.columns].reset_index(drop=True),
        frame.loc[untouched.to_numpy()].reset_index(drop=True),
    )
    again, _, _ = inject_noise(frame, 0.4, seed=3, positive_share=0.5)
    pd.testing.assert_frame_equal(noisy, again)  # seeded
    other, _, _ = inject_noise(frame, 0.4, seed=4, positive_share=0.5)
    assert not other.equals(noisy)


def test_noise_level_zero_and_unlabelled_rows() -> None:
    frame = _frame()
    clean, corrupted, report = inject_noise(frame, 0.0, seed=1)
    assert corrupted.empty and clean[frame.columns].equals(frame)
    frame.loc[: len(frame) - 3, "anchor_label"] = None  # only 2 rows carry labels
    _, corrupted, report = inject_noise(frame, 0.5, seed=1)
    assert report.eligible == 2 and len(corrupted) == 2
    with pytest.raises(DataError, match="label columns"):
        inject_noise(frame.drop(columns=["anchor_label"]), 0.2, seed=1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        inject_noise(frame, 1.0, seed=1)


def test_subset_per_task_is_seeded_and_bounded() -> None:
    frame = _frame()
    small = subset_per_task(frame, 4, seed=1)
    assert small["task_name"].value_counts().to_dict() == {"TaskA": 4, "TaskB": 4}
    assert small.equals(subset_per_task(frame, 4, seed=1))
    assert subset_per_task(frame, None, seed=1) is frame


def test_plan_runs_base_once_then_every_noise_seed_and_arm(repo_root: Path, tmp_path: Path) -> None:
    settings = _settings(repo_root, tmp_path, seeds=[1, 2], noise_levels=[0.0, 0.3])
    specs = plan(settings)
    assert [s.label for s in specs[:3]] == [
        "base/noise-0.00/seed-42",
        "mnrl/noise-0.00/seed-1",
        "gist/noise-0.00/seed-1",
    ]
    assert len(specs) == 1 + 2 * 2 * 2 and len({s.label for s in specs}) == len(specs)


def test_verdict_is_a_tie_inside_the_spread() -> None:
    def cell(mean, std, n=3):
        return {"mean": mean, "std": std, "n": n}

    assert verdict(cell(0.80, 0.01), cell(0.79, 0.02)) == "tie"
    assert verdict(cell(0.80, 0.01), cell(0.75, 0.02)) == "win"
    assert verdict(cell(0.70, 0.01), cell(0.75, 0.0, n=1)) == "loss"
    assert verdict(cell(0.80, 0.0, n=1), cell(0.75, 0.0, n=1)) == "no spread"


def _records() -> list[RunRecord]:
    categories = {"STSBenchmark": "STS", "Banking77Classification": "Classification"}
    out = [RunRecord("base", 0.0, 42, {"STSBenchmark": 0.80, "Banking77Classification": 0.70}, categories)]
    for noise, drop in ((0.0, 0.0), (0.4, 0.05)):
        for seed, jitter in ((1, -0.01), (2, 0.0), (3, 0.01)):
            out.append(
                RunRecord(
                    "mnrl",
                    noise,
                    seed,
                    {"STSBenchmark": 0.82 - drop + jitter, "Banking77Classification": 0.74 - drop},
                    categories,
                    train_loss=1.0 + noise,
                )
            )
            out.append(
                RunRecord(
                    "gist",
                    noise,
                    seed,
                    {"STSBenchmark": 0.82 - drop / 5 + jitter, "Banking77Classification": 0.745 - drop / 5},
                    categories,
                    train_loss=1.1,
                    masked={"guide_masked_fraction": 0.05 + noise / 10, "guide_masked_same_label": 0.4},
                )
            )
    return out


def test_summary_means_spreads_and_verdicts(repo_root: Path, tmp_path: Path) -> None:
    settings = _settings(repo_root, tmp_path, noise_levels=[0.0, 0.4])
    summary = summarize(_records(), settings)
    assert summary["metrics"] == ["STSBenchmark", "Banking77Classification", "type:Classification", "type:STS", "mean"]
    gist0 = summary["cells"]["gist"]["0.00"]["STSBenchmark"]
    assert gist0["mean"] == pytest.approx(0.82) and gist0["std"] == pytest.approx(0.01) and gist0["n"] == 3
    assert summary["cells"]["base"]["0.40"]["mean"]["mean"] == pytest.approx(0.75)  # base stands for every level
    by = {(c["arm"], c["against"], c["noise"], c["metric"]): c["verdict"] for c in summary["comparisons"]}
    assert by[("gist", "mnrl", 0.0, "STSBenchmark")] == "tie"  # 0 difference, spread 0.01
    assert by[("gist", "mnrl", 0.4, "STSBenchmark")] == "win"  # 0.04 apart, spread 0.01
    assert by[("gist", "mnrl", 0.0, "Banking77Classification")] == "win"  # constant across seeds: no spread to hide in
    assert summary["masked"]["gist"]["0.40"]["guide_masked_fraction"] == pytest.approx(0.09)
    assert summary["train_loss"]["mnrl"]["0.40"]["mean"] == pytest.approx(1.4)


def test_report_table_chart_and_docs_copy(repo_root: Path, tmp_path: Path) -> None:
    settings = _settings(repo_root, tmp_path, noise_levels=[0.0, 0.4], docs="docs/ablation.md")
    summary = summarize(_records(), settings)
    markdown = summary_markdown(summary, settings, "gist ablation")
    assert "Command: `gist ablation`" in markdown
    assert "| gist | 40% | 81.00 ± 1.00 | 73.50 ± 0.00 |" in markdown
    assert "| gist | mnrl | 40% | +4.00 win |" in markdown
    paths = write_report(summary, settings, "gist ablation")
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    docs = (tmp_path / "docs" / "ablation.md").read_text()
    assert docs.startswith(markdown) and "![score vs noise level per arm](ablation.png)" in docs
    assert (tmp_path / "docs" / "ablation.png").read_bytes() == paths["chart"].read_bytes()


def test_arm_settings_are_validated(repo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="a base arm trains nothing"):
        _settings(repo_root, tmp_path, arms=[{"name": "b", "base": True, "train": {"loss": "mnrl"}}])
    with pytest.raises(ConfigError, match=r"\['max_steps'\] are set by the ablation section"):
        _settings(repo_root, tmp_path, arms=[{"name": "g", "train": {"max_steps": 5}}])
    with pytest.raises(ConfigError, match="arm 'g': loss"):
        _settings(repo_root, tmp_path, arms=[{"name": "g", "train": {"loss": "triplet"}}])
    with pytest.raises(ConfigError, match="arm 'g': positive_strategy"):
        _settings(repo_root, tmp_path, arms=[{"name": "g", "mining": {"positive_strategy": "best"}}])
    with pytest.raises(ConfigError, match="noise_levels must be distinct fractions"):
        _settings(repo_root, tmp_path, noise_levels=[0.0, 1.2])
    with pytest.raises(ConfigError, match=r"compare names arms that are not in arms: \['base', 'mnrl'\]"):
        _settings(repo_root, tmp_path, arms=[{"name": "gist", "train": {"loss": "gist"}}])
    with pytest.raises(ConfigError, match="duplicate arm names"):
        _settings(repo_root, tmp_path, arms=[{"name": "a", "base": True}, {"name": "a", "base": True}], compare=[])


def test_ui_parameters_pick_arms_and_reject_bad_values(repo_root: Path, tmp_path: Path) -> None:
    settings = _settings(repo_root, tmp_path)
    picked = apply_ablation_parameters(settings, AblationParameters(arms=["base", "gist"], seeds=[5, 6, 7]))
    assert [a.name for a in picked.ablation.arms] == ["base", "gist"]
    assert picked.ablation.compare == [("gist", "base")] and picked.ablation.seeds == [5, 6, 7]
    quick = apply_ablation_parameters(settings, AblationParameters(quick=True))
    assert quick.ablation.max_steps == 2 and quick.ablation.docs is None
    with pytest.raises(ConfigError, match=r"arms: unknown \['nope'\]"):
        apply_ablation_parameters(settings, AblationParameters(arms=["nope"]))
    with pytest.raises(ConfigError, match="noise_levels"):
        apply_ablation_parameters(settings, AblationParameters(noise_levels=[0.5, 0.5]))
    with pytest.raises(ValueError, match="max_steps"):
        AblationParameters(max_steps=0)


def test_run_key_holds_content_not_names(repo_root: Path, tmp_path: Path) -> None:
    """Changed task data, another mteb or library version, or other weights under the same name: run again."""
    from gist_core.ablation.plan import RunSpec, run_key

    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    settings = settings_from_dict(raw, tmp_path)
    spec = RunSpec("gist", 0.0, 1)
    identity = {
        "task_revisions": {"STSBenchmark": "r1"},
        "mteb": "2.26.24",
        "libraries": "torch==2.13.0",
        "student": "s" * 64,
        "guide": "g" * 64,
        "training_code": "c" * 64,
    }
    key = run_key(settings, spec, "md5", identity)
    assert run_key(settings, spec, "md5", dict(identity)) == key
    for field, value in [
        ("task_revisions", {"STSBenchmark": "r2"}),
        ("mteb", "2.27.0"),
        ("libraries", "torch==2.14.0"),
        ("student", "t" * 64),
        ("guide", "h" * 64),
        ("training_code", "d" * 64),
    ]:
        assert run_key(settings, spec, "md5", {**identity, field: value}) != key, field
    moved = settings.model_copy(update={"train": settings.train.model_copy(update={"output_dir": "elsewhere"})})
    assert run_key(moved, spec, "md5", identity) == key, "output paths are not content"
