"""What lets a rerun skip the data task, and how a run's overrides reach DVC.

DVC already makes ``dvc repro`` a no-op when nothing changed; the Prefect cache on the data task
also skips the DVC calls (repro, remote lookup, push). Its key is a hash of everything DVC would
look at: the stages in dvc.yaml, dvc.lock, the remote configuration, the content of the stages'
dependencies and the values of the params they read, as this run sets them. A key is only given
when the working tree holds the outputs dvc.lock names (same md5), so a cached data version always
matches the files the next tasks read; otherwise the task runs and DVC brings the outputs back.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from gist_core.config import PARAMS_FILE, Settings, load_settings
from gist_core.hashing import file_md5, update_with_file

log = logging.getLogger(__name__)


def _stages(root: Path) -> dict[str, Any]:
    try:
        return (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return {}


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def dvc_params(settings: Settings) -> dict[str, Any]:
    """``{dotted key: value}`` of every params.yaml key a stage of dvc.yaml reads, from these settings."""
    dumped = settings.model_dump(mode="json")
    keys = sorted(
        {
            entry
            for stage in _stages(settings.root).values()
            for entry in stage.get("params") or []
            if isinstance(entry, str)
        }
    )
    return {key: _lookup(dumped, key) for key in keys}


def _hash_path(digest: Any, root: Path, relative: str) -> None:
    path = root / relative
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(root)).encode())
        if file.is_file():
            update_with_file(digest, file)
        else:
            digest.update(b"<missing>")


def _outputs_match_lock(root: Path, locked: dict[str, Any]) -> bool:
    for entry in locked.values():
        for out in (entry or {}).get("outs") or []:
            path, md5 = root / out["path"], str(out.get("md5", ""))
            if md5.endswith(".dir"):
                if not path.is_dir():
                    return False
            elif not path.is_file() or file_md5(path) != md5:
                return False
    return True


def data_cache_key(settings: Settings) -> str | None:
    """A key for the data task's cache, or None (do not cache) when an output is not what dvc.lock says.

    Covers every stage in dvc.yaml (the data task reproduces the data stage and, when training uses
    it, the guide-embedding cache stage).
    """
    root = settings.root
    stages = _stages(root)
    try:
        locked = (yaml.safe_load((root / "dvc.lock").read_text()) or {})["stages"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    if not stages or not _outputs_match_lock(root, locked):
        return None
    digest = hashlib.sha256()
    digest.update(str(root.resolve()).encode())  # one cache per checkout: a remote may be a relative path
    digest.update(yaml.safe_dump(stages, sort_keys=True).encode())
    digest.update(yaml.safe_dump(locked, sort_keys=True).encode())
    digest.update(json.dumps(dvc_params(settings), sort_keys=True).encode())
    config = root / ".dvc" / "config"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for dep in sorted({str(d) for stage in stages.values() for d in stage.get("deps") or []}):
        _hash_path(digest, root, dep)
    return f"gist-data-{digest.hexdigest()}"


@contextmanager
def dvc_params_applied(settings: Settings) -> Iterator[bool]:
    """Make params.yaml hold this run's values of the keys DVC stages read; restore the file afterwards.

    ``dvc repro`` reads params.yaml, not the run's in-memory overrides. When a run changes a setting
    a stage depends on (data sources, max_per_task, seed, student, guide, ...), the file is
    rewritten for the DVC calls the way ``dvc exp run --set-param`` does, so dvc.lock records the
    params the outputs were built from, and put back byte for byte afterwards. Yields whether the
    file was changed.
    """
    path = settings.root / PARAMS_FILE
    wanted = dvc_params(settings)
    if dvc_params(load_settings(settings.root)) == wanted:
        yield False
        return
    original = path.read_bytes()
    raw = yaml.safe_load(original) or {}
    for dotted, value in wanted.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    log.info("settings DVC stages read differ from %s for this run: writing them for `dvc repro`", path)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        yield True
    finally:
        path.write_bytes(original)
