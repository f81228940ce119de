"""fsutil: the one way to write (temp name beside the target, fsync, rename) for files and directories."""

from __future__ import annotations

import pytest
from conftest import temp_files

from alt_i2v.fsutil import atomic_dir, atomic_path, atomic_write_bytes, commit, remove_stale_temps, temp_path


def test_temp_names_are_hidden_beside_the_target_and_found_by_the_leftover_check(tmp_path):
    tmp = temp_path(tmp_path / "model.keras", keep_suffix=True)
    assert tmp.parent == tmp_path and tmp.name.startswith(".model.keras.") and tmp.suffix == ".keras"
    tmp.write_bytes(b"half")  # what a kill during model.save leaves
    assert temp_files(tmp_path) == [tmp]  # the check the training tests use would see it
    assert remove_stale_temps(tmp_path) == 1 and temp_files(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new, half written")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and temp_files(tmp_path) == []


def test_commit_renames_a_finished_temp_over_the_target(tmp_path):
    target = tmp_path / "img.png"
    tmp = temp_path(target)
    tmp.write_bytes(b"streamed")
    assert commit(tmp, target) == target
    assert target.read_bytes() == b"streamed" and not tmp.exists()


def test_atomic_dir_replaces_a_whole_directory_or_nothing(tmp_path):
    out = tmp_path / "index"
    with atomic_dir(out) as d:
        (d / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            (d / "a").write_text("2")
            raise RuntimeError("killed")
    assert (out / "a").read_text() == "1"
    with atomic_dir(out) as d:
        (d / "b").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b"]  # the old directory is gone, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temp or old directory left
