"""The two data stages through the `gist data` command, with a tiny random guide."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()
OUTPUTS = ("data/prepared/triplets.parquet", "reports/data.json", "reports/data.md", "reports/quarantine.csv")


@pytest.fixture
def project(repo_root: Path, models_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> Path:
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["base"].update({"models_dir": str(models_dir), "guide": str(tiny_model_dir)})
    raw["data"]["classification"] = raw["data"]["classification"][1:]  # Emotion, Tweet (Banking77 is sorted)
    for i, source in enumerate(raw["data"]["classification"]):
        # the first 120 rows of two shipped train splits
        lines = (repo_root / source["path"]).read_text(encoding="utf-8").splitlines()[:121]
        small = tmp_path / f"small{i}{Path(source['path']).suffix}"
        small.write_text("\n".join(lines) + "\n", encoding="utf-8")
        source["path"] = str(small)
    raw["data"]["mining"].update({"max_texts_per_task": 80, "cache_dir": str(tmp_path / "guide-cache")})
    raw["data"]["max_per_task"] = 50
    raw["evaluate"].update({"tasks": ["STSBenchmark"], "data_dir": str(repo_root / "data" / "raw")})
    raw["gate"]["required_tasks"] = ["STSBenchmark"]
    root = tmp_path / "proj"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def _gist(root: Path, *args: str) -> str:
    result = runner.invoke(app, ["data", "--root", str(root), *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_mine_then_combine_then_both_again(project: Path) -> None:
    assert "guide embeddings" in _gist(project, "--step", "embed")
    assert "mined triplets" in _gist(project, "--step", "mine")
    assert (project / "data/prepared/mined/triplets.parquet").is_file()
    out = _gist(project, "--step", "combine")
    assert "100 triplets from 240 rows" in out
    first = {name: (project / name).read_bytes() for name in OUTPUTS}
    report = json.loads(first["reports/data.json"])
    assert report["totals"]["kept"] == 100 and report["totals"]["guide_scored"] == 100
    assert report["guide"]["fingerprint"] and report["contamination"]["tasks"] == [
        "STSBenchmark",
        "EmotionClassification",
        "TweetSentimentExtractionClassification",
    ]
    for source in report["sources"].values():
        removed = sum(source[b] for b in ("quarantined", "degenerate", "duplicates", "decontaminated", "not_sampled"))
        assert source["input_rows"] == source["kept"] + removed
    # both steps again (cached guide embeddings): byte-identical outputs
    _gist(project)
    assert {name: (project / name).read_bytes() for name in OUTPUTS} == first


def test_combine_refuses_stale_mined_triplets(project: Path) -> None:
    _gist(project, "--step", "embed")
    _gist(project, "--step", "mine")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["mining"]["top_k"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = runner.invoke(app, ["data", "--root", str(project), "--step", "combine"])
    assert result.exit_code == 1
    assert "was mined with other settings (mining)" in result.output


def test_a_missing_guide_is_one_line(project: Path, tmp_path: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["base"]["models_dir"] = str(tmp_path / "no-models")
    params["base"]["guide"] = "all-mpnet-base-v2"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = runner.invoke(app, ["data", "--root", str(project), "--step", "embed"])
    assert result.exit_code == 1
    assert "error: the data stage needs the guide" in result.output and "gist models provision" in result.output


def test_mining_from_stored_embeddings_is_byte_identical_without_the_guide(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data version is a function of versioned files: given the `embed` stage's output, mining and
    combining need no model and give the same bytes, whatever the embedding store holds."""
    _gist(project, "--step", "embed")
    _gist(project, "--step", "mine")
    _gist(project, "--step", "combine")
    produced = ["data/prepared/mined/triplets.parquet", *OUTPUTS]
    first = {name: (project / name).read_bytes() for name in produced}
    params = yaml.safe_load((project / "params.yaml").read_text())
    # no guide model and an empty embedding store: only the stored embeddings remain
    from gist_core.data import embed, guide_encoder

    def no_model(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the guide model was loaded")

    monkeypatch.setattr(guide_encoder, "load_sentence_transformer", no_model)
    monkeypatch.setattr(embed, "load_guide", no_model)
    params["data"]["mining"]["cache_dir"] = str(tmp_path / "empty-store")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / "data/prepared/mined/triplets.parquet").unlink()
    _gist(project, "--step", "mine")
    _gist(project, "--step", "combine")
    assert {name: (project / name).read_bytes() for name in produced} == first
    assert not (tmp_path / "empty-store").exists(), "mining read the stored embeddings, not the guide"
    # embeddings of other data are refused, not recomputed
    stored = project / "data/prepared/guide_embeddings"
    manifest = json.loads((stored / "manifest.json").read_text())
    manifest["params"]["max_seq_length"] = 7
    (stored / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["data", "--root", str(project), "--step", "mine"])
    assert result.exit_code == 1 and "was computed with other settings (max_seq_length)" in result.output
