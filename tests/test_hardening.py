"""Bad input and concurrent commands (issue 10): each case reproduces a way data was lost or a stage crashed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import msgpack
import numpy as np
import pytest

from alt_i2v.store import STORE_DIR, Store, build_store, pack
from alt_i2v.vocab import build_vocab
from conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alt_i2v", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, **kw)


def small_store(tmp_path: Path, n: int = 24) -> Path:
    data = tmp_path / "data"
    make_dataset(data, n=n, seed=3, size=24)
    build_vocab(data)
    build_store(data, image_size=16, workers=1, quiet=True)
    return data


# 1. A store record can crash the reader ---------------------------------------------------------------------


def test_hostile_store_records_are_skipped_and_reported_not_decoded(tmp_path):
    import plyvel

    data = small_store(tmp_path)
    evil = {  # the record: a structured dtype with an object field (its bytes would become pointers)
        "i100": {"id": 100, "image": {b"nd": True, b"type": [["a", "|O"]], b"shape": (64, 64, 3),
                                      b"data": b"A" * 98304}, "labels": [0], "split": "train"},
        "i101": {"id": 101, "image": {b"nd": True, b"type": "|O", b"kind": b"", b"shape": (16, 16, 3),
                                      b"data": b"A" * 6144}, "labels": [0], "split": "train"},
        "i102": {"id": 102, "image": {b"nd": True, b"type": "<f8", b"kind": b"", b"shape": (16, 16, 3),
                                      b"data": b"\0" * 6144}, "labels": [0], "split": "train"},  # wrong dtype
        "i103": {"id": 103, "image": {b"nd": True, b"type": "|u1", b"kind": b"", b"shape": (1 << 20, 16, 3),
                                      b"data": b"\0" * 768}, "labels": [0], "split": "train"},  # lying shape
        "i104": pack({"id": 104, "image": np.zeros((8, 8, 3), np.uint8), "labels": [0], "split": "train"}),
    }
    db = plyvel.DB(str(data / STORE_DIR))
    for key, rec in evil.items():
        raw = rec if isinstance(rec, bytes) else msgpack.packb(rec, use_bin_type=True)
        db.put(b"r/" + key.encode(), raw)
        db.put(b"s/train/" + key.encode(), pack([0]))
    db.close()
    # a subprocess, so that a segfault shows up as a failed test rather than a dead pytest
    code = textwrap.dedent(f"""
        import json, sys
        from alt_i2v.pipeline import StoreDataset
        from alt_i2v.store import Store
        from alt_i2v.errors import BadRecordError
        with Store({str(data)!r}) as s:
            ds = StoreDataset.from_split(s, "train", batch_size=8)
            n = 0
            for i in range(len(ds)):
                x, y = ds[i]
                assert x.shape[1:] == (16, 16, 3) and len(x) == len(y)
                n += len(x)
            try:
                s.get("i100")
                raise SystemExit("get() returned a hostile record")
            except BadRecordError as e:
                err = str(e)
            print(json.dumps({{"images": n, "train": s.count("train"), "bad": s.bad_report(), "err": err}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["images"] == got["train"]  # every real record read, none of the five hostile ones
    assert sorted(b["key"] for b in got["bad"]) == sorted(evil)
    assert "i100" in got["err"] and "plain numeric" in got["err"]


# 2. --build --rebuild deleted the store before taking its lock ------------------------------------------------


def test_rebuild_refuses_while_another_process_reads_the_store_then_swaps_atomically(tmp_path):
    data = small_store(tmp_path)
    with Store(data) as s:
        before = {k: s.get(k)["labels"] for k in s.ids()}
    reader = subprocess.Popen(  # a second real process holding the store open, as --train does
        [sys.executable, "-c", f"import sys; from alt_i2v.store import Store; s = Store({str(data)!r}); "
                               "print('open', flush=True); sys.stdin.read(); print(len(s.ids()))"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert reader.stdout.readline().strip() == "open"
        busy = run_cli("--build", "--rebuild", "--data", str(data), "--image-size", "16", "--workers", "1",
                       "--quiet")
        assert busy.returncode == 1 and "in use by another process" in busy.stderr, busy.stderr
        out, _ = reader.communicate("", timeout=60)  # the reader still reads every record: nothing was removed
    finally:
        reader.kill() if reader.poll() is None else None
    assert reader.returncode == 0 and int(out.split()[-1]) == len(before)
    done = run_cli("--build", "--rebuild", "--data", str(data), "--image-size", "16", "--workers", "1", "--quiet")
    assert done.returncode == 0, done.stderr
    with Store(data) as s:
        assert {k: s.get(k)["labels"] for k in s.ids()} == before and s.count() == len(before)
    assert sorted(p.name for p in data.iterdir() if "store" in p.name) == [".store.lock", "store"]


def test_rebuild_killed_before_its_swap_is_completed_by_the_next_build(tmp_path):
    from alt_i2v.store import _finish_swap

    data = small_store(tmp_path)
    store = data / STORE_DIR
    store.rename(data / ".store.old")  # killed between the two renames: the new store is still beside it
    build_store(data, image_size=16, workers=1, rebuild=True, quiet=True)  # builds .store.rebuild, swaps
    assert (store / "CURRENT").exists() and not (data / ".store.old").exists()
    (data / ".store.old").mkdir()
    _finish_swap(store)
    assert not (data / ".store.old").exists() and (store / "CURRENT").exists()


# 6. --build with posts.jsonl missing wiped the store ---------------------------------------------------------


def test_build_without_posts_is_an_error_and_a_large_prune_needs_the_flag(tmp_path):
    data = small_store(tmp_path, n=20)
    posts = data / "posts.jsonl"
    lines = posts.read_text().splitlines(keepends=True)
    posts.unlink()
    gone = run_cli("--build", "--data", str(data), "--image-size", "16", "--workers", "1", "--quiet")
    assert gone.returncode == 1 and "no posts" in gone.stderr, gone.stderr
    posts.write_text("")
    assert run_cli("--build", "--data", str(data), "--image-size", "16", "--quiet").returncode == 1
    posts.write_text("not json\n")
    assert run_cli("--build", "--data", str(data), "--image-size", "16", "--quiet").returncode == 1
    posts.write_text("".join(lines[:10]))  # half the posts left: refused without --prune
    half = run_cli("--build", "--data", str(data), "--image-size", "16", "--workers", "1", "--quiet")
    assert half.returncode == 1 and "--prune" in half.stderr, half.stderr
    with Store(data) as s:
        assert s.count() == 20  # nothing was removed by any of the refused builds
    posts.write_text("".join(lines[:18]))  # 10% gone: an ordinary build prunes it
    assert build_store(data, image_size=16, workers=1, quiet=True).removed == 2
    posts.write_text("".join(lines[:9]))
    pruned = run_cli("--build", "--prune", "--data", str(data), "--image-size", "16", "--workers", "1", "--quiet")
    assert pruned.returncode == 0, pruned.stderr
    with Store(data) as s:
        assert s.count() == 9
