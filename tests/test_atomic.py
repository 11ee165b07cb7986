"""atomic.py: a file or folder appears complete under its final name, or the old one stays."""

from __future__ import annotations

import pytest

from univigu.atomic import atomic_directory, atomic_file, atomic_write_text


def test_directory_replaces_the_old_one_only_once_the_new_one_is_complete(tmp_path):
    final = tmp_path / "best"
    with atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not final.exists()  # nothing under the final name while writing
    assert (final / "a.txt").read_text() == "one"

    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "one"  # a failed write leaves the old folder

    with atomic_directory(final) as tmp:
        (tmp / "b.txt").write_text("two")
        assert (final / "a.txt").read_text() == "one"  # the old folder stays until the rename
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temporary or old folder left


def test_file_writes_through_a_temporary_name(tmp_path):
    path = tmp_path / "sub" / "x.json"
    atomic_write_text(path, "{}")
    assert path.read_text() == "{}"
    with pytest.raises(ValueError):
        with atomic_file(path) as tmp:
            tmp.write_text("partial")
            raise ValueError("bad")
    assert path.read_text() == "{}" and sorted(p.name for p in path.parent.iterdir()) == ["x.json"]
