"""Folders written whole or not at all: the one staging-and-swap every output folder uses.

A stage that writes a folder (the guide-embedding cache, the `embed` stage's embeddings, a trained
model) writes it under ``<name>.partial`` next to the destination and swaps it in at the end. A
reader never sees a half-written folder: until the swap it sees the previous one, after it the new
one. A write that raises leaves the previous folder in place and removes its ``.partial`` one; a
process killed mid-write leaves its ``.partial`` folder behind, and the next attempt removes it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def swap_in(staged: Path, dest: Path) -> None:
    """Replace ``dest`` by ``staged`` (a folder next to it): the old folder is moved aside, then removed."""
    old = dest.with_name(dest.name + ".old")
    _remove(old)
    if dest.exists() or dest.is_symlink():
        dest.rename(old)
    staged.rename(dest)
    _remove(old)


@contextmanager
def replaced_folder(dest: Path) -> Iterator[Path]:
    """Yield an empty staging folder next to ``dest``; on a normal exit it becomes ``dest``.

    On an exception ``dest`` is left as it was and the staging folder is removed.
    """
    staged = dest.with_name(dest.name + ".partial")
    _remove(staged)
    staged.mkdir(parents=True)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    swap_in(staged, dest)
