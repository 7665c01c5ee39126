"""Data versioning with DVC, and the git commit a run was made from.

DVC is driven through its command line (``python -m dvc``), the interface it keeps stable. The data
version a run records is the md5 DVC wrote for the stage's output in dvc.lock.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from gist_core.errors import VersioningError

log = logging.getLogger(__name__)

DATA_STAGE = "data"


@dataclass(frozen=True)
class DataVersion:
    stage: str
    path: str  # output path relative to the project root
    md5: str
    remote: str | None

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # Stage commands call `gist`: make the interpreter's own scripts folder win, venv activated or not.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def dvc_failure(output: str) -> str:
    """The lines of a failed DVC command's output that say why, joined into one line.

    A stage command's own ``error: ...`` line first (``gist`` prints one for a problem the user can
    fix), then DVC's ``ERROR: ...`` lines; the last output line when there is neither.
    """
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    ours = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    dvc = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR: ")]
    reasons = list(dict.fromkeys(ours + dvc)) or lines[-1:] or ["no output"]
    return "; ".join(reasons)


def run_dvc(root: Path, *args: str, show: bool = False, where: str = "") -> str:
    """Run a DVC command in the project and return its output; on failure a one-line VersioningError.

    With ``show`` the command's output (stage logs, progress bars) streams to stderr as it comes, so
    long stages inside ``dvc repro`` show progress. ``where`` names what the command talks to (a
    remote and its URL) in the error.
    """
    cmd = [sys.executable, "-m", "dvc", *args]
    log.info("dvc %s", " ".join(args))
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
    assert proc.stdout is not None
    chunks = []
    for chunk in iter(lambda: proc.stdout.read1(1 << 14), b""):  # type: ignore[union-attr]
        chunks.append(chunk)
        if show:
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
    output = b"".join(chunks).decode("utf-8", errors="replace")
    if proc.wait() != 0:
        target = f" ({where})" if where else ""
        raise VersioningError(f"`dvc {' '.join(args)}` failed in {root}{target}: {dvc_failure(output)}")
    return output


def default_remote(root: Path) -> str | None:
    """``NAME URL`` of the default remote, or None when there is none."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "config", "core.remote"], cwd=root, capture_output=True, text=True, env=_env()
    )
    name = proc.stdout.strip()
    if proc.returncode != 0 or not name:
        return None
    # Read the URL by key: `dvc remote list` wraps long lines when stdout is not a terminal.
    url = run_dvc(root, "config", f"remote.{name}.url").strip()
    return f"{name} {url}"


def lock_md5(root: Path, stage: str, out_path: str) -> str:
    """The md5 of a stage output as recorded in dvc.lock."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        raise VersioningError(f"{lock}: not found; run `dvc repro {stage}` first")
    data = yaml.safe_load(lock.read_text()) or {}
    outs = (data.get("stages", {}).get(stage) or {}).get("outs") or []
    for out in outs:
        if out.get("path") == out_path:
            return str(out["md5"])
    raise VersioningError(f"{lock}: stage {stage!r} has no output {out_path!r}")


def push_to_remote(root: Path, *targets: str, attempts: int = 3, backoff_seconds: float = 2.0) -> None:
    """``dvc push`` to the default remote, retried with exponential backoff while it fails.

    The error names the remote and its URL (for S3, the bucket) and says why in one line.
    """
    remote = default_remote(root)
    if remote is None:
        raise VersioningError(f"{root}: no default DVC remote; add one with `dvc remote add -d NAME URL`")
    for attempt in range(1, attempts + 1):
        try:
            run_dvc(root, "push", *targets, show=True, where=f"remote {remote}")
            return
        except VersioningError as err:
            if attempt == attempts:
                raise
            wait = backoff_seconds * 2 ** (attempt - 1)
            log.warning("dvc push failed (attempt %d/%d), retrying in %.0f s: %s", attempt, attempts, wait, err)
            time.sleep(wait)


def version_data(root: Path, out_path: str, stage: str = DATA_STAGE, push: bool = True) -> DataVersion:
    """Reproduce the data stage (a no-op when nothing changed), push it, and return its version."""
    if not (root / ".dvc").is_dir():
        raise VersioningError(f"{root}: not a DVC project (no .dvc folder); run `dvc init`")
    run_dvc(root, "repro", stage, show=True)
    if push:
        # --with-deps: the upstream stages' outputs too (the mined triplets of the `mine` stage)
        push_to_remote(root, "--with-deps", stage)
    return DataVersion(stage, out_path, lock_md5(root, stage, out_path), default_remote(root))


def git_commit(root: Path) -> str:
    """The HEAD commit, suffixed with ``-dirty`` when tracked files differ; ``unknown`` outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


@dataclass(frozen=True)
class CheckoutUpdate:
    before: str
    after: str
    upstream: str

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def to_dict(self) -> dict[str, str | bool]:
        return {**asdict(self), "changed": self.changed}


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-6:])
        raise VersioningError(f"`git {' '.join(args)}` failed in {root}:\n{detail}")
    return proc.stdout.strip()


def update_checkout(root: Path) -> CheckoutUpdate:
    """Bring the checkout to its upstream's latest commit and fetch that commit's DVC outputs.

    For scheduled retraining: the run then trains on the latest data version (dvc.lock, params and
    inputs as committed upstream). ``git pull --ff-only``, then ``dvc pull --allow-missing`` (outputs
    not in the remote are rebuilt by ``dvc repro`` afterwards). Refuses, with the reason, when the
    checkout has uncommitted changes to tracked files, no upstream branch, or has diverged from it.
    """
    if not (root / ".git").exists():
        raise VersioningError(f"{root}: not a git checkout; cannot update it to the latest commit")
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    if dirty:
        files = ", ".join(line.split(maxsplit=1)[-1] for line in dirty.splitlines()[:5])
        raise VersioningError(f"{root}: uncommitted changes to tracked files ({files}); commit or revert them first")
    try:
        upstream = _git(root, "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{upstream}")
    except VersioningError:
        raise VersioningError(
            f"{root}: the current branch has no upstream (set one with `git branch --set-upstream-to`), "
            "or run without update_checkout"
        ) from None
    before = _git(root, "rev-parse", "HEAD")
    _git(root, "pull", "--ff-only", "--quiet")
    after = _git(root, "rev-parse", "HEAD")
    if (root / ".dvc").is_dir() and default_remote(root) is not None:
        run_dvc(root, "pull", "--allow-missing", show=True, where=f"remote {default_remote(root)}")
    log.info("checkout %s: %s -> %s (%s)", root, before[:12], after[:12], upstream)
    return CheckoutUpdate(before, after, upstream)
