"""distribute.py: data-parallel training on keras.distribution (JAX) over devices and processes.

The slow tests run real JAX processes on 127.0.0.1 (gloo collectives on CPU) and one process with two CPU
devices (XLA_FLAGS), all through the CLI with KERAS_BACKEND=jax, on a tiny model. Tolerance: the split
runs must match one device of the same global batch to 1e-4 (history metrics and weights; on CPU they
agree to float rounding, the collectives only change the order of a sum).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from alt_i2v.cli import main
from alt_i2v.store.views import store_view
from alt_i2v.training.distribute import DistConfig, ProcessSlice, settings_from_env, start
from alt_i2v.errors import UsageError
from alt_i2v.training.pipeline import StoreDataset
from alt_i2v.store import open_store

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
# dropout 0: Keras does not save a dropout layer's random state in a checkpoint, so a resumed run (on any
# number of devices) draws other dropout masks than an uninterrupted one
TRAIN_ARGS = ["--backbone", "tiny", "--weights", "none", "--batch-size", "16", "--workers", "1", "--dropout", "0",
              "--quiet"]
EPOCHS = 3


# ---------------------------------------------------------------------------------------------------------
# Fast: settings, slicing, store views (in this process, any backend)


def test_settings_come_from_flags_or_a_launchers_environment():
    env = {"ALT_I2V_COORDINATOR": "10.0.0.1:1234", "ALT_I2V_NUM_PROCESSES": "2", "ALT_I2V_PROCESS_ID": "1"}
    assert settings_from_env(env) == {"coordinator": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    keras_env = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234,10.0.0.2:2345",
                 "KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "0"}
    assert settings_from_env(keras_env)["coordinator"] == "10.0.0.1:1234"
    with pytest.raises(UsageError, match="ALT_I2V_PROCESS_ID"):
        settings_from_env({"ALT_I2V_PROCESS_ID": "one"})
    with pytest.raises(UsageError, match="--coordinator"):
        DistConfig(num_processes=2, process_id=1)
    with pytest.raises(UsageError, match="--process-id"):
        DistConfig(coordinator="h:1", num_processes=2, process_id=2)
    with pytest.raises(UsageError, match="--distribute"):
        DistConfig(distribute="all")


def test_one_device_has_no_distribution_and_other_backends_refuse_several(monkeypatch):
    assert start(DistConfig(distribute="none")).distribution is None
    if keras.backend.backend() != "jax":
        assert start(DistConfig()).distribution is None  # the single-device path, exactly as before
        with pytest.raises(UsageError, match="KERAS_BACKEND=jax"):
            start(DistConfig(devices=2))
    with pytest.raises(UsageError, match="--distribute none"):
        start(DistConfig(distribute="none", devices=2))


def test_cli_rejects_distribution_flags_elsewhere_and_bad_values(built_data, tmp_path, capsys):
    assert main(["--evaluate", "--data", str(built_data), "--model", str(tmp_path), "--devices", "2"]) == 2
    code = main(["--train", "--data", str(built_data), "--model", str(tmp_path / "m"), "--num-processes", "2",
                 "--process-id", "0"])
    assert code == 2 and "--coordinator" in capsys.readouterr().err


@pytest.mark.parametrize("processes,replicas,batch", [(2, 2, 32), (2, 4, 24), (3, 3, 21)])
def test_process_slices_are_the_global_batch_cut_in_equal_parts(built_data, processes, replicas, batch):
    """The processes' slices of every global batch, put together, are the whole batch (images,
    augmentation, labels, weights), and every training record is in exactly one slice per epoch."""
    with open_store(built_data) as store:
        keys, labels = store.index("train")
        ds = StoreDataset(store, keys, labels, batch_size=batch, shuffle=True, augment=True, seed=3, epoch=1)
        slices = [ProcessSlice(ds, p, processes, replicas) for p in range(processes)]
        seen = []
        for b in range(len(ds)):
            whole_x, whole_y, whole_w = ds[b]
            parts = [s[b] for s in slices]
            assert len({len(w) for _, _, w in parts}) == 1  # every process feeds the same shape
            for k in ("image", "augment"):
                np.testing.assert_array_equal(np.concatenate([x[k] for x, _, _ in parts]), whole_x[k])
            np.testing.assert_array_equal(np.concatenate([y for _, y, _ in parts]), whole_y)
            np.testing.assert_array_equal(np.concatenate([w for _, _, w in parts]), whole_w)
            idx, n = ds.padded_indices(b)
            for s in slices:
                lo, hi = s.part(b)
                seen += [keys[i] for i in idx[lo:min(hi, n)]]
        assert sorted(seen) == sorted(keys)
        with pytest.raises(UsageError, match="multiple of 4"):
            ProcessSlice(StoreDataset(store, keys, labels, batch_size=30), 0, 2, 4)


def test_store_views_are_private_hard_linked_and_wait_for_a_writer(built_data, tmp_path):
    """LevelDB lets one process open a store: each process of a run opens its own view (hard-linked table
    files), taken under LevelDB's own lock so that no build changes the store meanwhile."""
    import socket as sock

    data = tmp_path / "data"
    shutil.copytree(built_data, data)
    stale = data / ".store-views" / f"{sock.gethostname()}-999999999"  # a view whose process is gone
    stale.mkdir(parents=True)
    with open_store(data):  # opening a LevelDB moves its log into a table file
        pass
    view = store_view(data / "store")
    assert not stale.exists()
    tables = list(view.glob("*.ldb"))
    assert tables and all(os.stat(f).st_nlink > 1 for f in tables)  # linked, not copied
    with open_store(view) as mine, open_store(data) as original:  # both open at once
        assert mine.counts() == original.counts() and mine.ids("train") == original.ids("train")
        code = ("import sys; from alt_i2v.store.views import store_view\n"
                "try:\n    store_view(sys.argv[1], timeout=1)\nexcept Exception as e:\n    print(e)")
        out = subprocess.run([sys.executable, "-c", code, str(data / "store")], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert "in use by another process" in out.stdout, out.stdout + out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------
# Slow: real JAX processes through the CLI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALT_I2V_", "KERAS_DISTRIBUTION_"))}
    env.update(KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _launch(data: Path, model: Path, *extra: str, devices: int = 1, record_log: Path | None = None
            ) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "alt_i2v", "--train", "--data", str(data), "--model", str(model),
           *TRAIN_ARGS, *extra]
    env = {**_env(devices), **({"ALT_I2V_RECORD_LOG": str(record_log)} if record_log else {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _processes(data: Path, model: Path, *extra: str, n: int = 2, record_log: Path | None = None
               ) -> list[subprocess.Popen]:
    where = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", str(n)]
    return [_launch(data, model, *where, "--process-id", str(i), *extra, record_log=record_log) for i in range(n)]


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny dataset (train and val sizes even: no padding, so the runs must agree exactly), the
    reference run on one device, and the same run on 2 devices of one process."""
    from conftest import make_dataset

    from alt_i2v.store import build_store
    from alt_i2v.data.vocab import build_vocab

    root = tmp_path_factory.mktemp("dist")
    data = root / "data"
    make_dataset(data, n=64, seed=1, size=40)
    build_vocab(data)
    build_store(data, image_size=16, workers=1, quiet=True)
    with open_store(data) as s:
        counts = s.counts()
    assert counts["train"] % 2 == 0 and counts["val"] % 2 == 0 and counts["train"] % 16, counts
    shutil.copytree(data, root / "copy")  # two single-process runs at once: one store each
    procs = [_launch(data, root / "one", "--epochs", str(EPOCHS), "--distribute", "none"),
             _launch(root / "copy", root / "two_devices", "--epochs", str(EPOCHS), devices=2)]
    _finish(procs)
    return {"data": data, "root": root, "counts": counts}


def _history(model: Path) -> list[dict]:
    with open(model / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _weights(model_file: Path) -> dict[str, np.ndarray]:
    import h5py

    out = {}
    with zipfile.ZipFile(model_file) as z, h5py.File(z.open("model.weights.h5"), "r") as h:
        h.visititems(lambda name, obj: out.__setitem__(name, np.asarray(obj)) if hasattr(obj, "shape") else None)
    return out


def assert_same_run(a: Path, b: Path, tol: float = TOL) -> None:
    """Two model directories hold the same training: files, history metrics, weights, thresholds, state."""
    def files(d):
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert files(a) == files(b)
    ha, hb = _history(a), _history(b)
    assert [r["epoch"] for r in ha] == [r["epoch"] for r in hb]
    for ra, rb in zip(ha, hb):
        for k in ("loss", "auc", "f1", "val_loss", "val_auc", "val_f1"):
            assert abs(float(ra[k]) - float(rb[k])) <= tol, (k, ra, rb)
    wa, wb = _weights(a / "model.keras"), _weights(b / "model.keras")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=tol, rtol=tol, err_msg=k)
    ta, tb = (json.loads((d / "thresholds.json").read_text()) for d in (a, b))
    assert abs(ta["global"] - tb["global"]) <= tol
    sa, sb = (json.loads((d / "checkpoints" / "state.json").read_text()) for d in (a, b))
    for k in ("epoch", "last", "best_epoch", "wait", "finished"):
        assert sa[k] == sb[k], k


@pytest.mark.slow
def test_two_devices_in_one_process_match_one_device(runs):
    root = runs["root"]
    config = json.loads((root / "two_devices" / "config.json").read_text())
    assert config["backend"] == "jax" and config["finished"]
    assert_same_run(root / "one", root / "two_devices")


@pytest.fixture(scope="module")
def two_processes(runs):
    """Two 2-process runs at once: one uninterrupted, with a record log, and one whose process 1 gets
    SIGKILL after the first epoch (its process 0 must then stop by itself)."""
    root, data = runs["root"], runs["data"]
    whole = _processes(data, root / "two_processes", "--epochs", str(EPOCHS), record_log=root / "records")
    killed = _processes(data, root / "killed", "--epochs", str(EPOCHS), "--peer-timeout", "30")
    state = root / "killed" / "checkpoints" / "state.json"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not (state.exists() and json.loads(state.read_text())["epoch"] >= 1):
            assert killed[0].poll() is None, killed[0].communicate()[0][-3000:]
            time.sleep(0.05)
        os.kill(killed[1].pid, signal.SIGKILL)
        killed_at = time.time()
        out0, _ = killed[0].communicate(timeout=120)
        stopped_after = time.time() - killed_at
    finally:
        for p in killed:
            if p.poll() is None:
                p.kill()
            p.communicate()
    whole_out = _finish(whole)
    return {"model": root / "two_processes", "log": root / "records", "killed": root / "killed",
            "out": whole_out,
            "killed_rc": killed[0].returncode, "killed_out": out0, "stopped_after": stopped_after}


@pytest.mark.slow
def test_two_processes_match_one_device(runs, two_processes):
    assert_same_run(runs["root"] / "one", two_processes["model"])
    assert not any("joining" in out for out in two_processes["out"])  # --quiet: no start-up line either


@pytest.mark.slow
def test_two_processes_see_every_training_record_once_per_epoch(runs, two_processes):
    with open_store(runs["data"]) as s:
        train_keys = sorted(k.decode() for k in s.ids("train"))
    per_process = []
    for p in (0, 1):
        lines = (two_processes["log"] / f"records-p{p}.txt").read_text().split("\n")
        per_process.append([line.split() for line in lines if line])
    for epoch in range(EPOCHS):
        mine = [{key for e, _, key in rows if int(e) == epoch} for rows in per_process]
        assert mine[0] and mine[1] and not mine[0] & mine[1]  # each process reads its own half
        both = [key for rows in per_process for e, _, key in rows if int(e) == epoch]
        assert sorted(both) == train_keys  # together: every record, once


@pytest.mark.slow
def test_kill_9_of_one_process_stops_the_other_then_resume_gives_the_same_model_directory(runs, two_processes):
    out0 = two_processes["killed_out"]
    assert two_processes["killed_rc"] == 1, out0[-3000:]
    assert "process 1 of 2" in out0 and "--resume" in out0, out0[-3000:]
    assert two_processes["stopped_after"] < 30 + 15  # within the peer timeout, not a hang
    model = two_processes["killed"]
    state = json.loads((model / "checkpoints" / "state.json").read_text())
    assert 1 <= state["epoch"] < EPOCHS and not state["finished"]

    _finish(_processes(runs["data"], model, "--epochs", str(EPOCHS), "--resume"))
    assert_same_run(two_processes["model"], model)
    assert not list((runs["data"] / ".store-views").iterdir())  # every process's store view is gone
