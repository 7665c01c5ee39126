"""Content hashes of files and folders: the one chunked implementation every cache key and version uses.

A file's hash is of its bytes; a folder's (or any labelled set of files') is a sha256 over each
file's label and the digest of its bytes, so where a folder lives never changes its hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 20


def update_with_file(digest: Any, path: Path) -> Any:
    """Feed a file's bytes to a hashlib object in 1 MiB chunks; returns the object."""
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (``md5`` is what DVC records for a file output)."""
    return update_with_file(hashlib.new(algorithm), path).hexdigest()


def file_md5(path: Path) -> str:
    """The md5 of a file's bytes: a DVC file output's version."""
    return file_digest(path, "md5")


def labelled_files_digest(files: Iterable[tuple[str, Path]], label_end: bytes = b"", extra: bytes = b"") -> str:
    """sha256 over each ``(label, file)`` in order: the label's bytes (then ``label_end``) and the file's sha256.

    ``extra`` (settings that change what the files mean) is folded in last, after ``b"settings\\0"``.
    """
    digest = hashlib.sha256()
    for label, path in files:
        digest.update(label.encode() + label_end)
        digest.update(update_with_file(hashlib.sha256(), path).digest())
    if extra:
        digest.update(b"settings\0" + extra)
    return digest.hexdigest()


def folder_files(folder: Path, exclude_names: Iterable[str] = ()) -> list[Path]:
    """The files below ``folder``, sorted, without those named in ``exclude_names``."""
    skip = frozenset(exclude_names)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip)


def folder_digest(folder: Path, exclude_names: Iterable[str] = ()) -> str:
    """A content hash of a folder: each file's path relative to it and its bytes (not where the folder is)."""
    files = folder_files(folder, exclude_names)
    return labelled_files_digest((p.relative_to(folder).as_posix(), p) for p in files)


def text_digest(text: str) -> bytes:
    """The sha256 of a text's UTF-8 bytes (lone surrogates kept), as raw bytes: a compact, exact text key."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def seed_for(seed: int, name: str) -> int:
    """A 64-bit seed from a base seed and a name, independent of the order names come in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def json_digest(payload: Any) -> str:
    """sha256 of a value's canonical JSON (sorted keys, compact, UTF-8): the key of a set of settings."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
