"""fsutil: the one way to write (temp name beside the target, fsync, rename) for files and directories."""

from __future__ import annotations

import os

import pytest
from conftest import temp_files

from alt_i2v.fsutil import (NotRegularFile, atomic_dir, atomic_path, atomic_write_bytes, commit, file_digest,
                            is_regular_file, is_temp_name, open_regular, remove_stale_temps, temp_path)


def test_temp_names_are_hidden_beside_the_target_and_found_by_the_leftover_check(tmp_path):
    tmp = temp_path(tmp_path / "model.keras", keep_suffix=True)
    assert tmp.parent == tmp_path and tmp.name.startswith(".~alt-i2v-") and tmp.suffix == ".keras"
    assert "model.keras" in tmp.name and is_temp_name(tmp.name)
    tmp.write_bytes(b"half")  # what a kill during model.save leaves
    assert temp_files(tmp_path) == [tmp]  # the check the training tests use would see it
    assert remove_stale_temps(tmp_path) == 0  # its writer (this process) still runs: not stale
    dead = tmp.with_name(tmp.name.replace(f"-{os.getpid()}-", "-999999999-", 1))
    tmp.rename(dead)  # what a killed run left
    assert remove_stale_temps(tmp_path) == 1 and temp_files(tmp_path) == []


def test_the_sweep_removes_only_names_this_program_made_and_never_enters_a_source_folder(tmp_path):
    """issue 22 case 1: a user's hidden ``*.part`` files are theirs, wherever they are."""
    raw = tmp_path / "raw"
    raw.mkdir()
    user = [tmp_path / ".video.mkv.part", raw / ".video.mkv.part", tmp_path / ".a.png.1234-deadbeef.part",
            tmp_path / ".~alt-i2v-notes.part"]
    for p in user:
        p.write_text("mine")
    ours = tmp_path / ".~alt-i2v-999999999-0123abcd-a.png.part"
    ours.write_bytes(b"half")
    in_source = raw / ".~alt-i2v-999999999-0123abcd-b.png.part"
    in_source.write_bytes(b"half")
    folder = tmp_path / ".~alt-i2v-999999999-89abcdef-export.part"  # a killed directory write
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x").write_text("1")
    assert remove_stale_temps(tmp_path, exclude=[raw]) == 2
    assert all(p.exists() for p in user) and in_source.exists()
    assert not ours.exists() and not folder.exists()


def test_open_regular_refuses_fifos_and_devices_without_blocking(tmp_path):
    fifo = tmp_path / "p.png"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.png"
    zero.symlink_to("/dev/zero")
    for p, kind in ((fifo, "FIFO"), (zero, "device"), (tmp_path, "directory")):
        with pytest.raises(NotRegularFile, match=kind):
            open_regular(p)
        with pytest.raises(NotRegularFile):
            file_digest(p)
        assert not is_regular_file(p)
    (tmp_path / "a").write_bytes(b"abc")
    with open_regular(tmp_path / "a") as f:
        assert f.read() == b"abc"
    assert is_regular_file(tmp_path / "a")


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
