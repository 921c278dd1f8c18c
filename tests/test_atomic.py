"""Atomic writes: complete under the final name, or the previous version untouched and no temp left."""

from __future__ import annotations

import pytest

from liteasr import atomic


def test_write_text_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "report.json"
    atomic.write_text(path, "one")
    atomic.write_text(path, "two")
    assert path.read_text() == "two" and [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_failed_file_write_keeps_previous_version(tmp_path):
    path = tmp_path / "plan.json"
    atomic.write_text(path, "old")
    with pytest.raises(RuntimeError), atomic.file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_directory_refuses_existing_and_cleans_up_on_failure(tmp_path):
    out = tmp_path / "model"
    with atomic.directory(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic.directory(out):
            pass
    with pytest.raises(RuntimeError), atomic.directory(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("interrupted")
    assert [p.name for p in out.iterdir()] == ["a.txt"] and [p.name for p in tmp_path.iterdir()] == ["model"]
    with atomic.directory(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert [p.name for p in out.iterdir()] == ["b.txt"]
