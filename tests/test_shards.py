"""shards.py and readers.py: a store in N LevelDB shards written by one process each, read by reader
processes; the same records, batches, training and evaluation as the one-shard store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from alt_i2v.errors import AltI2VError, UsageError
from alt_i2v.store import ShardedStore, shard_name, shard_of, shards_for_process
from alt_i2v.store import build_store, open_store
from alt_i2v.data.vocab import build_vocab

from conftest import jpeg_dataset, rerun_killed_build


def _copy_dataset(src: Path, dst: Path) -> Path:
    """posts.jsonl, images and vocab.json of ``src`` (no store)."""
    dst.mkdir(parents=True)
    shutil.copytree(src / "images", dst / "images")
    for name in ("posts.jsonl", "vocab.json"):
        shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def sharded_data(built_data, tmp_path_factory):
    """The session store's dataset built again into 3 shards (same vocab, size and splits)."""
    data = _copy_dataset(built_data, tmp_path_factory.mktemp("sharded") / "data")
    build_store(data, image_size=32, workers=2, quiet=True, shards=3)
    return data


def test_every_record_is_in_exactly_one_shard_and_reads_like_the_one_shard_store(built_data, sharded_data):
    store_dir = sharded_data / "store"
    assert sorted(p.name for p in store_dir.iterdir()) == \
        ["meta.json"] + [shard_name(i, 3) for i in range(3)]
    assert json.loads((store_dir / "meta.json").read_text())["shards"] == 3
    with open_store(built_data) as one, open_store(sharded_data) as many:
        assert isinstance(many, ShardedStore) and many.num_shards == 3 and one.num_shards == 1
        assert many.counts() == one.counts()
        seen: dict[bytes, int] = {}
        for i, shard in enumerate(many.stores):
            assert shard.meta["shard"] == i and shard.meta["shards"] == 3
            for key in shard.ids():
                assert key not in seen and shard_of(key, 3) == i
                seen[key] = i
        assert sorted(seen) == sorted(one.ids()) and set(seen.values()) == {0, 1, 2}
        for split in ("train", "val", "test"):
            assert many.index(split) == one.index(split)  # same records, same (key) order
        keys = one.ids("train")[:40]
        np.testing.assert_array_equal(many.get_batch(keys)[0], one.get_batch(keys)[0])
        assert many.get(keys[3])["labels"] == one.get(keys[3])["labels"]


def test_a_rerun_keeps_the_layout_and_resharding_is_an_explicit_rebuild(sharded_data, dataset_dir):
    result = build_store(sharded_data, image_size=32, workers=1, quiet=True)  # --shards left out: keep 3
    assert result.stored == 0 and result.already == 400
    with pytest.raises(UsageError, match="--shards 2 --rebuild"):
        build_store(sharded_data, image_size=32, quiet=True, shards=2)
    build_vocab(dataset_dir)
    build_store(dataset_dir, image_size=32, workers=1, quiet=True)
    with pytest.raises(UsageError, match="reshard"):
        build_store(dataset_dir, image_size=32, quiet=True, shards=4)
    build_store(dataset_dir, image_size=32, workers=2, quiet=True, shards=4, rebuild=True)
    with open_store(dataset_dir) as s:
        assert s.num_shards == 4 and s.count() == 120


def test_processes_own_disjoint_shards(sharded_data):
    from alt_i2v.training.pipeline import StoreDataset

    assert shards_for_process(8, 1, 3) == [1, 4, 7]
    owned = [s for p in range(3) for s in shards_for_process(8, p, 3)]
    assert sorted(owned) == list(range(8))
    with pytest.raises(UsageError, match="shards"):
        shards_for_process(2, 0, 3)
    with open_store(sharded_data) as store:  # two training processes: each reads its own shards, together all
        parts = [StoreDataset.from_split(store, "train", shards=shards_for_process(3, p, 2)).keys for p in (0, 1)]
        assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(store.ids("train"))
        assert {store.shard_of(k) for k in parts[1]} == {1}


def test_reader_processes_give_the_batches_threads_give(built_data, sharded_data):
    from alt_i2v.training.pipeline import StoreDataset, measure_pipeline
    from alt_i2v.training.readers import ReaderPool

    one = open_store(built_data)
    many = open_store(sharded_data)
    kw = dict(batch_size=48, shuffle=True, augment=True, seed=4)
    try:
        with ReaderPool(many, processes=2) as pool:
            threads = StoreDataset.from_split(one, "train", workers=2, **kw)
            procs = StoreDataset.from_split(many, "train", readers=pool, **kw)
            assert pool.processes == 2 and len(procs) == len(threads) > 2

            def same(i):
                a, b = threads[i], procs[i]
                np.testing.assert_array_equal(a[0]["image"], b[0]["image"])
                np.testing.assert_array_equal(a[0]["augment"], b[0]["augment"])
                np.testing.assert_array_equal(a[1], b[1])
                np.testing.assert_array_equal(a[2], b[2])

            for i in range(len(procs)):  # in order: read ahead by the processes
                same(i)
            for ds in (threads, procs):
                ds.set_epoch(1)
            for i in (2, 0, len(procs) - 1, 1):  # out of order, another epoch
                same(i)
            assert measure_pipeline(procs) > 0
            procs.close()
            with pytest.raises(AltI2VError, match="in use"):
                open_store(sharded_data / "store" / shard_name(0, 3))  # the readers hold the shards
    finally:
        one.close()
        many.close()
    with open_store(sharded_data) as again:  # released by the pool: readable here again
        assert again.count() == 400


def test_sharded_build_killed_with_sigkill_resumes_to_a_complete_store(tmp_path):
    data = jpeg_dataset(tmp_path / "data", 300, seed=6)
    cmd = [sys.executable, "-m", "alt_i2v", "--build", "--data", str(data), "--workers", "2", "--quiet",
           "--image-size", "64", "--shards", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
    store = data / "store"
    def started() -> bool:  # every shard opened (a missing one is an incomplete store) and one WriteBatch done
        return len(list(store.glob("shard-*/CURRENT"))) == 3 and \
            any(p.stat().st_size > 1_000_000 for p in store.glob("shard-*/*.log"))

    while time.time() < deadline and proc.poll() is None and not started():
        time.sleep(0.05)
    assert proc.poll() is None, "the build ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the build and its shard writers, as `kill -9` of the group
    proc.wait()
    for _ in range(200):  # until the shard writers are gone too (they hold the shards' LevelDB locks)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    rerun_killed_build(data, cmd, 300, timeout=180)
    with open_store(data) as s:
        ids = s.ids()
        assert s.count() == 300 and len(ids) == len(set(ids)) == 300
        assert sum(len(shard.ids()) for shard in s.stores) == 300
        ok = s.read_into(ids, np.empty((300, 64, 64, 3), np.uint8))
        assert ok.all()


@pytest.mark.slow
def test_sharded_and_one_shard_stores_train_resume_and_evaluate_identically(built_data, sharded_data, tmp_path):
    from alt_i2v.training.evaluation import evaluate
    from alt_i2v.model.modeldir import load_model
    from alt_i2v.model.history import read_history
    from alt_i2v.training.run import train

    # a constant learning rate (a cosine schedule spans the epochs a run starts with: 1 vs 2 here) and no
    # dropout (its masks after a resume are not those of an uninterrupted run)
    kw = dict(backbone="tiny", batch_size=48, lr=3e-3, workers=2, quiet=True, patience=0, schedule="constant",
              dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(built_data, tmp_path / "one", epochs=2, **kw)
        train(sharded_data, tmp_path / "many", epochs=1, **kw)
        train(sharded_data, tmp_path / "many", epochs=2, resume=True, **kw)  # resumed at epoch 2
    a, b = read_history(tmp_path / "one" / "history.csv"), read_history(tmp_path / "many" / "history.csv")
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for key in ("loss", "auc", "val_loss", "val_auc", "val_f1"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), key
    wa, wb = load_model(tmp_path / "one").get_weights(), load_model(tmp_path / "many").get_weights()
    for x, y in zip(wa, wb):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    ea = evaluate(built_data, tmp_path / "one", quiet=True).metrics
    eb = evaluate(sharded_data, tmp_path / "many", quiet=True).metrics
    for key in ("map", "auc", "micro_f1", "macro_f1"):
        assert ea[key] == pytest.approx(eb[key], rel=1e-4, abs=1e-5), key


def test_reader_processes_weight_a_bad_record_zero_and_report_it(tmp_path, built_data):
    import plyvel

    from alt_i2v.training.pipeline import StoreDataset
    from alt_i2v.training.readers import ReaderPool
    from alt_i2v.store import pack

    data = _copy_dataset(built_data, tmp_path / "data")
    build_store(data, image_size=32, workers=2, quiet=True, shards=2)
    with open_store(data) as store:
        victim = store.ids("train")[5]
        path = store.shard_paths()[store.shard_of(victim)]
    db = plyvel.DB(str(path))  # a record whose image is not what the meta promises
    db.put(b"r/" + victim, pack({"id": 0, "image": np.zeros((8, 8, 3), np.uint8), "labels": [0], "split": "train"}))
    db.close()
    with open_store(data) as store, ReaderPool(store, processes=2) as pool:
        ds = StoreDataset.from_split(store, "train", batch_size=64, readers=pool)
        x, y, w = ds[0]
        pos = ds.keys.index(victim)
        assert w[pos] == 0 and (x["image"][pos] == 0).all() and w.sum() == 63
        assert [b["key"] for b in store.bad_report()] == [victim.decode()] and "image is" in store.bad[victim]
        ds.close()


def test_a_reader_process_that_dies_is_a_clear_error_not_a_hang(sharded_data):
    from alt_i2v.training.pipeline import StoreDataset
    from alt_i2v.training.readers import ReaderPool

    with open_store(sharded_data) as store, ReaderPool(store, processes=2) as pool:
        ds = StoreDataset.from_split(store, "train", batch_size=32, readers=pool)
        ds[0]
        os.kill(pool._procs[1].pid, signal.SIGKILL)
        pool._procs[1].join()
        with pytest.raises(AltI2VError, match="reader process .* stopped"):
            for i in range(len(ds)):
                ds.set_epoch(i + 1)  # new epochs: nothing read ahead before the kill can satisfy them
                ds[0]
