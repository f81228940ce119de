"""The processes of a distributed run: joining it (``jax.distributed.initialize`` once per process),
heartbeats in the coordinator's key-value store, and stopping every process with an error that names the
one that died, hung or failed (:class:`PeerError`), instead of waiting forever in a collective."""

from __future__ import annotations

import atexit
import math
import os
import socket
import sys
import threading
import time
from typing import Any

from ..errors import AltI2VError, UsageError

KV = "alt_i2v/"
BEAT_SECONDS = 1.0
DEAD_AFTER_ERROR_SECONDS = 5.0  # a peer silent this long after a failed collective is taken as dead


class PeerError(AltI2VError):
    """Another process of a distributed run died, hung or failed; this one stops too."""


FAILED = threading.Event()
STARTED: dict[str, Any] = {}


def _exit_without_shutdown_barrier() -> None:
    """After a failure in a multi-process run, exit now: JAX's shutdown barrier would wait for processes
    that are gone and then abort with a core dump; the error has been printed already."""
    if FAILED.is_set():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def join(config: Any, quiet: bool = False) -> None:
    """``jax.distributed.initialize`` once per process for ``config`` (a DistConfig), with timeouts from its
    ``peer_timeout``, and this process's heartbeat."""
    import jax

    key = (config.coordinator, config.num_processes, config.process_id)
    if STARTED.get("key") is not None:  # the heartbeats of the first run ended with it
        raise UsageError("one distributed training per process: start new processes for another run")
    timeout = int(math.ceil(float(config.peer_timeout)))
    join = max(timeout, 60)
    from .coordinator import bind_address, check_in, claim, roll_call

    if config.process_id == 0:
        sock = claim(config.coordinator)  # one line for a port in use or a host not of this machine
    if not quiet:
        print(f"alt-i2v: process {config.process_id} of {config.num_processes} joining the run at "
              f"{config.coordinator} (waiting up to {join} s for every process)", file=sys.stderr, flush=True)
    # every id checked in once before JAX starts: a duplicate --process-id is named at once, not a C++ abort
    if config.process_id == 0:
        roll_call(sock, config.num_processes, join)
    else:
        check_in(config.coordinator, config.process_id, config.num_processes, join)
    jax.distributed.initialize(coordinator_address=config.coordinator, num_processes=config.num_processes,
                               process_id=config.process_id, initialization_timeout=join,
                               # JAX's own verdict comes after ours, which names the process clearly
                               heartbeat_timeout_seconds=timeout + 30,
                               shutdown_timeout_seconds=24 * 3600,
                               # the host given, not every interface: the coordinator has no authentication
                               coordinator_bind_address=bind_address(config.coordinator))
    STARTED["key"] = key
    atexit.register(_exit_without_shutdown_barrier)  # runs before JAX's own atexit shutdown (LIFO)
    STARTED["watchdog"] = Watchdog(config)


# ---------------------------------------------------------------------------------------------------------
# Heartbeats


class Watchdog:
    """Heartbeats through the coordinator's key-value store, and a thread that stops this process with a
    clear error when another one stops beating for ``peer_timeout`` seconds or reports a failure."""

    def __init__(self, config: Any):
        from jax._src import distributed

        self.client = distributed.global_state.client
        self.me, self.count = config.process_id, config.num_processes
        self.timeout = float(config.peer_timeout)
        self.coordinator = config.coordinator
        self.seen: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._watch = False
        self._beat = 0
        self.client.key_value_set(f"{KV}host/{self.me}", f"{socket.gethostname()} pid {os.getpid()}",
                                  allow_overwrite=True)
        self._thread = threading.Thread(target=self._run, name="alt-i2v-heartbeat", daemon=True)
        self._thread.start()

    def start_watching(self) -> None:
        now = time.monotonic()
        self.seen = {p: ("", now) for p in range(self.count) if p != self.me}
        self._watch = True

    def stop(self, done: bool) -> None:
        if done and not self._stop.is_set():
            try:
                self.client.key_value_set(f"{KV}done/{self.me}", "1", allow_overwrite=True)
            except Exception:  # noqa: BLE001 - the coordinator may be gone already
                pass
        self._stop.set()

    def publish_failure(self, message: str) -> None:
        try:
            self.client.key_value_set(f"{KV}failed/{self.me}", message[:2000], allow_overwrite=True)
        except Exception:  # noqa: BLE001
            pass
        self._stop.set()

    def host(self, p: int) -> str:
        try:
            return self.client.key_value_try_get(f"{KV}host/{p}")
        except Exception:  # noqa: BLE001
            return "unknown host"

    def _run(self) -> None:
        unreachable_since = None
        while not self._stop.wait(BEAT_SECONDS):
            try:
                self._beat += 1
                self.client.key_value_set(f"{KV}beat/{self.me}", str(self._beat), allow_overwrite=True)
                unreachable_since = None
                verdict = self._check(self.timeout) if self._watch else None
            except Exception as e:  # noqa: BLE001 - the coordinator itself is unreachable
                unreachable_since = unreachable_since or time.monotonic()
                verdict = None
                if time.monotonic() - unreachable_since > min(self.timeout, 15):
                    verdict = PeerError(self._message(0, f"cannot be reached at {self.coordinator} "
                                                         f"({str(e).splitlines()[0][:200]})"))
            if verdict is not None and not self._stop.is_set():
                print(f"alt-i2v: error: {verdict}", file=sys.stderr, flush=True)
                os._exit(1)

    def _check(self, silent_for: float) -> PeerError | None:
        failed = dict(self.client.key_value_dir_get(f"{KV}failed/"))
        for key, message in sorted(failed.items()):
            p = int(key.rsplit("/", 1)[-1])
            if p != self.me:
                return PeerError(self._message(p, f"failed: {message}"))
        done = {int(k.rsplit("/", 1)[-1]) for k, _ in self.client.key_value_dir_get(f"{KV}done/")}
        beats = {int(k.rsplit("/", 1)[-1]): v for k, v in self.client.key_value_dir_get(f"{KV}beat/")}
        now = time.monotonic()
        for p, (last, since) in list(self.seen.items()):
            value = beats.get(p, "")
            if value != last:
                self.seen[p] = (value, now)
            elif p not in done and now - since > silent_for:
                return PeerError(self._message(p, f"sent no heartbeat for {now - since:.0f} s: it died or hangs"))
        return None

    def diagnose(self, wait: float) -> PeerError | None:
        """Which process is gone, waiting up to ``wait`` s for a dead one's heartbeat to go stale."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                verdict = self._check(DEAD_AFTER_ERROR_SECONDS)
            except Exception:  # noqa: BLE001
                return PeerError(self._message(0, f"cannot be reached at {self.coordinator}"))
            if verdict is not None:
                return verdict
            time.sleep(0.25)
        return None

    def _message(self, p: int, what: str) -> str:
        who = "the coordinator, " if p == 0 else ""
        host = self.host(p) if p != 0 or "reached" not in what else self.coordinator
        return (f"process {p} of {self.count} ({who}{host}) {what}. Training stopped on this process "
                f"({self.me}) too; the epochs completed so far are kept in the model directory: start every "
                "process again, with --resume to continue")


__all__ = ["PeerError", "Watchdog", "join", "FAILED", "STARTED", "DEAD_AFTER_ERROR_SECONDS"]
