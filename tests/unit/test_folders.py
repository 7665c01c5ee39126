"""Output folders are replaced whole: a reader sees the old folder or the new one, never half of one."""

from __future__ import annotations

from pathlib import Path

import pytest

from gist_core.folders import replaced_folder


def test_a_folder_is_swapped_in_whole_and_the_old_one_removed(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "cache"
    with replaced_folder(dest) as staged:
        assert staged == tmp_path / "out" / "cache.partial" and not dest.exists()
        (staged / "a.txt").write_text("first")
    assert (dest / "a.txt").read_text() == "first"
    with replaced_folder(dest) as staged:
        (staged / "b.txt").write_text("second")
        assert (dest / "a.txt").read_text() == "first"  # the old folder serves readers until the swap
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cache"]  # no .partial or .old left


def test_a_failed_write_keeps_the_old_folder_and_drops_the_partial_one(tmp_path: Path) -> None:
    dest = tmp_path / "cache"
    with replaced_folder(dest) as staged:
        (staged / "a.txt").write_text("kept")
    (tmp_path / "cache.partial").mkdir()  # left by a run that was killed
    (tmp_path / "cache.partial" / "junk").write_text("x")
    with pytest.raises(RuntimeError, match="disk full"), replaced_folder(dest) as staged:
        assert not (staged / "junk").exists()  # a killed run's leftovers are not reused
        (staged / "a.txt").write_text("half")
        raise RuntimeError("disk full")
    assert (dest / "a.txt").read_text() == "kept"
    assert not (tmp_path / "cache.partial").exists()
