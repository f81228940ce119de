"""coordinator.py: the --coordinator address checked before JAX starts, the roll call that names a
duplicate --process-id, and JAX's coordinator bound to the host given (issue 22, cases 13-15). The
process tests run the real CLI (or jax.distributed.initialize) with KERAS_BACKEND=jax on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from alt_i2v.cli import main
from alt_i2v.training.coordinator import bind_address, check_in, claim, parse_address, roll_call
from alt_i2v.training.distribute import DistConfig
from alt_i2v.errors import AltI2VError, UsageError

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--backbone", "tiny", "--weights", "none", "--batch-size", "16", "--workers", "1", "--epochs", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALT_I2V_", "KERAS_DISTRIBUTION_"))}
    env.update(KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return env


@pytest.mark.parametrize("address,problem", [("127.0.0.1:99999", "outside 1..65535"), ("notaport", "HOST:PORT"),
                                             ("127.0.0.1:http", "not a number"), (":1234", "HOST:PORT"),
                                             ("127.0.0.1:0", "outside 1..65535")])
def test_a_bad_coordinator_address_is_a_one_line_usage_error(address, problem, built_data, tmp_path, capsys):
    """Case 14: refused at once, before JAX (it ran 68 s and aborted with a C++ trace for port 99999)."""
    with pytest.raises(UsageError, match=problem):
        DistConfig(coordinator=address, num_processes=2, process_id=1)
    t0 = time.monotonic()
    code = main(["--train", "--data", str(built_data), "--model", str(tmp_path / "m"), "--coordinator", address,
                 "--num-processes", "2", "--process-id", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and problem in err and len(err.splitlines()) <= 2, err
    assert time.monotonic() - t0 < 10 and not (tmp_path / "m").exists()


def test_process_0_refuses_a_port_in_use_and_a_host_not_of_this_machine():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(AltI2VError, match=f"port {port} is in use"):
            claim(f"127.0.0.1:{port}")
    with pytest.raises(AltI2VError, match="not an address of this machine"):
        claim(f"192.0.2.7:{_free_port()}")  # TEST-NET-1: never an address of this machine
    assert bind_address("[::1]:5000") == "[::1]:5000" and parse_address("[::1]:5000") == ("::1", 5000)


def test_the_roll_call_names_a_duplicate_id_and_tells_every_process():
    """Case 15 in one process: ids 1 and 1 of 3 check in; all three stop at once, the duplicate named."""
    port = _free_port()
    sock = claim(f"127.0.0.1:{port}")
    errors: dict[str, str] = {}

    def member(name: str, pid: int) -> None:
        try:
            check_in(f"127.0.0.1:{port}", pid, 3, timeout=20)
            errors[name] = "joined"
        except AltI2VError as e:
            errors[name] = str(e)

    threads = [threading.Thread(target=member, args=(n, 1)) for n in ("a", "b")]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    with pytest.raises(AltI2VError, match="--process-id 1 was given to two processes"):
        roll_call(sock, 3, timeout=20)
    for t in threads:
        t.join(20)
    assert time.monotonic() - t0 < 10
    assert all("--process-id 1 was given to two processes" in e for e in errors.values()) and len(errors) == 2


def test_the_roll_call_answers_once_every_id_is_there_and_frees_the_port():
    port = _free_port()
    sock = claim(f"127.0.0.1:{port}")
    seen: list[int] = []
    threads = [threading.Thread(target=lambda i=i: (check_in(f"127.0.0.1:{port}", i, 3, 20), seen.append(i)))
               for i in (1, 2)]
    for t in threads:
        t.start()
    roll_call(sock, 3, timeout=20)
    for t in threads:
        t.join(20)
    assert sorted(seen) == [1, 2]
    claim(f"127.0.0.1:{port}").close()  # JAX can take the port now


def test_a_missing_process_is_named_after_the_timeout():
    sock = claim(f"127.0.0.1:{_free_port()}")
    with pytest.raises(AltI2VError, match=r"process\(es\) 1, 2 of 3 did not join"):
        roll_call(sock, 3, timeout=1)


# ------------------------------------------------------------------------------------ real JAX processes

def _listeners(port: int) -> list[str]:
    """Local addresses of TCP sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.rpartition(":")
            if state == "0A" and int(hexport, 16) == port:
                found.append(addr)
    return found


@pytest.mark.slow
def test_jax_coordinator_listens_only_on_the_host_given():
    """Case 13: ``jax.distributed.initialize`` as a run starts it; it listened on every interface (*:PORT)."""
    port = _free_port()
    code = ("import sys, time\n"
            "from alt_i2v.training.distribute import DistConfig\n"
            "from alt_i2v.training.peers import join\n"
            f"join(DistConfig(coordinator='127.0.0.1:{port}', num_processes=1), quiet=True)\n"
            "print('up', flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "up", proc.stdout.read()[-2000:]
        listening = _listeners(port)
    finally:
        proc.kill()
        proc.wait()
    # 127.0.0.1 (gRPC may take it as the IPv4-mapped ::ffff:127.0.0.1), never 0.0.0.0 or [::]
    assert listening and set(listening) <= {"0100007F", "0000000000000000FFFF00000100007F"}, listening


def _train(data: Path, model: Path, port: int, pid: int, n: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "alt_i2v", "--train", "--data", str(data), "--model", str(model), *TRAIN,
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(pid)]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _assert_one_clear_line(out: str, text: str) -> None:
    assert text in out, out[-3000:]
    assert "Traceback" not in out and "Check failed" not in out and "*** " not in out, out[-3000:]


@pytest.mark.slow
def test_duplicate_process_ids_stop_every_process_in_bounded_time_and_say_so(built_data, tmp_path):
    """Case 15 with real training processes: two given --process-id 0 (the second finds the port taken)
    and two given --process-id 1 of 3 (process 0's roll call names them); every one exits 1 well before
    JAX's own 60 s+ abort, with a line that names the duplicate."""
    port = _free_port()
    first = _train(built_data, tmp_path / "a", port, 0, 2)
    try:
        deadline = time.monotonic() + 120
        while not _listeners(port) and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
        second = _train(built_data, tmp_path / "b", port, 0, 2)
        out, _ = second.communicate(timeout=120)
        assert second.returncode == 1
        _assert_one_clear_line(out, "is --process-id 0 given twice?")
    finally:
        first.kill()
        first.communicate()

    port = _free_port()
    t0 = time.monotonic()
    procs = [_train(built_data, tmp_path / f"m{i}", port, pid, 3) for i, pid in enumerate((0, 1, 1))]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1, 1], [o[-1500:] for o in outs]
    for out in outs:
        _assert_one_clear_line(out, "--process-id 1 was given to two processes")
    assert time.monotonic() - t0 < 150
    assert not any((tmp_path / f"m{i}" / "model.keras").exists() for i in range(3))


@pytest.mark.slow
def test_port_in_use_stops_process_0_with_one_line(built_data, tmp_path):
    """Case 14: it said "unexpected JaxRuntimeError: Failed to start RPC server"."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = _train(built_data, tmp_path / "m", port, 0, 2)
        out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1
    _assert_one_clear_line(out, f"port {port} is in use")
