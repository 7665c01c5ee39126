"""Data versioning against a real git + DVC repository and a local DVC remote."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gist_core.errors import VersioningError
from gist_core.versioning import git_commit, lock_md5, version_data
from tests.support.projects import make_project, run, tiny_params


@pytest.fixture
def project(tmp_path: Path, models_dir: Path) -> Path:
    return make_project(tmp_path / "proj", tiny_params(models_dir, tmp_path))


def test_version_data_repro_push_and_noop(project: Path) -> None:
    first = version_data(project, "data/prepared/triplets.parquet")
    assert first.md5 == lock_md5(project, "data", "data/prepared/triplets.parquet")
    assert first.remote and first.remote.startswith("local ")
    remote = project.parent / "proj-remote"
    assert any(p.is_file() for p in remote.rglob("*")), "push left the remote empty"
    status = run([sys.executable, "-m", "dvc", "status", "data"], project).stdout
    assert "up to date" in status.lower()
    # nothing changed: same version, and DVC reports the stage unchanged
    again = version_data(project, "data/prepared/triplets.parquet")
    assert again.md5 == first.md5
    # a param the stage reads changes the data version
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["max_per_task"] = 50
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = version_data(project, "data/prepared/triplets.parquet")
    assert changed.md5 != first.md5
    # the first version can be read back from the remote once the local cache is gone
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "v2"], project)
    import shutil

    shutil.rmtree(project / ".dvc" / "cache")
    run([sys.executable, "-m", "dvc", "pull", "data"], project)
    assert (project / "data/prepared/triplets.parquet").is_file()


def test_not_a_dvc_project(tmp_path: Path) -> None:
    with pytest.raises(VersioningError, match="not a DVC project"):
        version_data(tmp_path, "x")


def test_failed_stage_surfaces_dvc_message(project: Path) -> None:
    (project / "data/raw/classification/banking77/train.csv").unlink()
    with pytest.raises(VersioningError) as err:
        version_data(project, "data/prepared/triplets.parquet")
    message = str(err.value)
    assert message.startswith(f"`dvc repro data` failed in {project}: ") and "\n" not in message
    assert "banking77/train.csv not found" in message, message
    assert "failed to reproduce 'embed'" in message, "DVC's own line follows the stage's (embed reads the splits first)"


def test_lock_md5_errors(tmp_path: Path) -> None:
    with pytest.raises(VersioningError, match="dvc.lock: not found"):
        lock_md5(tmp_path, "data", "x")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    with pytest.raises(VersioningError, match="has no output"):
        lock_md5(tmp_path, "data", "x")


def test_git_commit(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == "unknown"
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f").write_text("a")
    for cmd in (
        ["git", "add", "f"],
        ["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x"],
    ):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    clean = git_commit(tmp_path)
    assert len(clean) == 40
    (tmp_path / "f").write_text("b")
    assert git_commit(tmp_path) == clean + "-dirty"


def test_git_commit_tells_a_new_dvc_lock_from_other_changes(tmp_path: Path) -> None:
    """After `dvc repro` only dvc.lock and the git-tracked stage outputs change: tagged apart from edits."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  data:\n    cmd: x\n    outs:\n      - out.parquet\n      - reports/q.csv:\n          cache: false\n"
        "    metrics:\n      - reports/data.json:\n          cache: false\n"
    )
    (tmp_path / "reports").mkdir()
    for name in ("dvc.lock", "reports/q.csv", "reports/data.json", "code.py"):
        (tmp_path / name).write_text("v1")
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=tmp_path, check=True)
    head = git_commit(tmp_path)
    for name in ("dvc.lock", "reports/q.csv", "reports/data.json"):
        (tmp_path / name).write_text("v2")
    assert git_commit(tmp_path) == head + "-dvc.lock"
    (tmp_path / "code.py").write_text("v2")
    assert git_commit(tmp_path) == head + "-dirty"


def test_update_checkout_pulls_the_latest_commit_and_its_data(tmp_path: Path, models_dir: Path) -> None:
    """A clone (the served checkout) catches up with its upstream: new params, and the data they made."""
    from gist_core.versioning import update_checkout

    upstream = make_project(tmp_path / "proj", tiny_params(models_dir, tmp_path))
    # upstream has a remote-backed data version committed; the clone has never built it
    params = yaml.safe_load((upstream / "params.yaml").read_text())
    params["data"]["mining"]["positive_strategy"] = "random"  # no guide: quick
    params["data"]["audit"]["guide_verdicts"] = False
    (upstream / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "cheap data"], upstream)
    clone = tmp_path / "served"
    run(["git", "clone", "-q", str(upstream), str(clone)], tmp_path)
    for config in (("user.email", "t@example.com"), ("user.name", "t")):
        run(["git", "config", *config], clone)
    unchanged = update_checkout(clone)
    assert not unchanged.changed and unchanged.upstream.startswith("origin/")

    params["data"]["max_per_task"] = 40
    (upstream / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    data = version_data(upstream, "data/prepared/triplets.parquet")  # repro + push to the shared remote
    run(["git", "add", "-A"], upstream)
    run(["git", "commit", "-qm", "new data version"], upstream)
    update = update_checkout(clone)
    assert update.changed and update.after == git_commit(upstream)
    assert yaml.safe_load((clone / "params.yaml").read_text())["data"]["max_per_task"] == 40
    assert lock_md5(clone, "data", "data/prepared/triplets.parquet") == data.md5
    assert (clone / "data/prepared/triplets.parquet").is_file(), "dvc pull fetched the new version's output"

    (clone / "params.yaml").write_text("# local edit\n" + (clone / "params.yaml").read_text())
    with pytest.raises(VersioningError, match=r"uncommitted changes to tracked files \(params.yaml\)"):
        update_checkout(clone)
    run(["git", "checkout", "-q", "--", "params.yaml"], clone)
    run(["git", "checkout", "-q", "-b", "local-only"], clone)
    with pytest.raises(VersioningError, match="has no upstream"):
        update_checkout(clone)
