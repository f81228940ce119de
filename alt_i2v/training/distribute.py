"""Data-parallel training over devices and processes: the one module that knows about either.

Built on Keras 3's ``keras.distribution`` (``DataParallel`` over a ``DeviceMesh``) on the JAX backend, and
``jax.distributed`` for several processes (one per host, each driving all its local devices):

- :func:`start` turns a :class:`DistConfig` into a :class:`Cluster`: nothing (one device, exactly the
  single-device path), a mesh of the local devices, or ``jax.distributed.initialize`` + a global mesh.
- The global batch (``--batch-size``) is split across every device of every process. Each process reads
  only its own slice of each global batch (:class:`ProcessSlice`) from its own copy or view of the store;
  together the processes feed exactly the batches one process would, so results match a one-device run
  of the same global batch, and every training record is read once per epoch.
- Process 0 alone reads and writes the model directory; what it read (settings, resume state, weights)
  reaches the others through collectives (:meth:`Cluster.agree`, :meth:`Cluster.sync_variables`).
- Every process publishes a heartbeat in the coordinator's key-value store; a process that dies or hangs
  makes the others stop with an error naming it (after ``peer_timeout`` seconds at most) instead of
  waiting forever in a collective (:mod:`.peers`).
"""

from __future__ import annotations

import json
import threading
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from keras.utils import PyDataset

from ..config import JsonConfig
from ..errors import AltI2VError, UsageError
from .peers import DEAD_AFTER_ERROR_SECONDS, FAILED, STARTED, PeerError, Watchdog, join

DISTRIBUTE_MODES = ("auto", "none")
# Settings a cluster launcher may give as environment variables (ours first, then Keras' own names), and
# ALT_I2V_RECORD_LOG: a diagnostic for checking how a run split its batches (no command-line flag).
ENV_VARS: dict[str, tuple[str, ...]] = {
    "coordinator": ("ALT_I2V_COORDINATOR", "KERAS_DISTRIBUTION_JOB_ADDRESSES"),
    "num_processes": ("ALT_I2V_NUM_PROCESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES"),
    "process_id": ("ALT_I2V_PROCESS_ID", "KERAS_DISTRIBUTION_PROCESS_ID"),
    "record_log": ("ALT_I2V_RECORD_LOG",),
}


@dataclass(frozen=True)
class DistConfig(JsonConfig):
    """How training spreads over devices and processes (``--distribute``, ``--devices``, ...).

    ``devices`` counts local devices per process (None: all of them). With ``num_processes`` > 1 every
    process gets the same ``coordinator`` (``HOST:PORT`` of process 0) and its own ``process_id``.
    ``record_log`` (a folder) makes each process log which records it fed, per epoch and batch.
    """

    distribute: str = "auto"
    devices: int | None = None
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    peer_timeout: float = 120.0
    record_log: str | None = None

    def __post_init__(self):
        if self.distribute not in DISTRIBUTE_MODES:
            raise UsageError(f"--distribute must be one of {', '.join(DISTRIBUTE_MODES)}, got {self.distribute!r}")
        if self.devices is not None and (not isinstance(self.devices, int) or self.devices < 1):
            raise UsageError(f"--devices must be a positive integer, got {self.devices!r}")
        if not isinstance(self.num_processes, int) or self.num_processes < 1:
            raise UsageError(f"--num-processes must be >= 1, got {self.num_processes!r}")
        if not isinstance(self.process_id, int) or not 0 <= self.process_id < self.num_processes:
            raise UsageError(f"--process-id must be in 0..{self.num_processes - 1}, got {self.process_id!r}")
        if self.num_processes > 1:
            if not self.coordinator:
                raise UsageError("several processes need --coordinator HOST:PORT (the address of process 0)")
            from .coordinator import parse_address

            parse_address(self.coordinator)  # a port out of range or not a number: one line, before JAX
            if self.distribute == "none":
                raise UsageError("--distribute none runs on one device; it cannot take --num-processes")
        if not float(self.peer_timeout) > 0:
            raise UsageError("--peer-timeout must be > 0 seconds")

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


def settings_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Coordinator, process count and id from a cluster launcher's environment variables (see ENV_VARS),
    and the record log; with Keras' comma-separated job list the first address is the coordinator."""
    out: dict[str, Any] = {}
    for key, names in ENV_VARS.items():
        for name in names:
            value = environ.get(name, "").strip()
            if not value:
                continue
            if key == "coordinator":
                out[key] = value.split(",")[0].strip()
            elif key == "record_log":
                out[key] = value
            else:
                try:
                    out[key] = int(value)
                except ValueError:
                    raise UsageError(f"${name} must be an integer, got {value!r}") from None
            break
    return out


# ---------------------------------------------------------------------------------------------------------
# The cluster


class Cluster:
    """This process's place in a run: its index, the devices of the mesh, the Keras distribution (None on
    one device), and the collectives and failure handling the training loop needs."""

    def __init__(self, config: DistConfig, *, process_index: int = 0, process_count: int = 1,
                 devices: Sequence[Any] = (), distribution: Any = None):
        self.config = config
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.devices = list(devices)
        self.distribution = distribution
        self._watchdog: Watchdog | None = None
        self._held = ExitStack()  # the store's shared lock, held for the run

    @property
    def is_writer(self) -> bool:
        """Process 0 alone reads and writes the model directory."""
        return self.process_index == 0

    @property
    def multi_process(self) -> bool:
        return self.process_count > 1

    @property
    def replicas(self) -> int:
        """Devices the global batch is split across (1 without a distribution)."""
        return max(1, len(self.devices))

    def describe(self) -> str:
        if self.distribution is None:
            return "one device"
        kind = self.devices[0].platform.upper()
        per = self.replicas // self.process_count
        return (f"{self.replicas} {kind} devices" + (f" ({self.process_count} processes x {per})"
                                                     if self.multi_process else ""))

    def scope(self):
        """Where the training model is built and fitted (its variables live on the mesh)."""
        return self.distribution.scope() if self.distribution is not None else nullcontext()

    def host_scope(self):
        """Where process 0 keeps its local copy of the training model (the checkpoint source): host memory,
        so that it takes nothing from the first accelerator."""
        if self.distribution is None:
            return nullcontext()
        import jax
        import keras

        try:
            jax.devices("cpu")
        except RuntimeError:  # JAX_PLATFORMS without cpu
            return nullcontext()
        return keras.device("cpu:0")

    @contextmanager
    def local(self) -> Iterator[None]:
        """Inside :meth:`scope`, work on this process alone (process 0 saving a checkpoint): no distribution,
        so nothing Keras does here turns into a collective the other processes never join."""
        if self.distribution is None:
            yield
            return
        import keras

        current = keras.distribution.distribution()
        keras.distribution.set_distribution(None)
        try:
            yield
        finally:
            keras.distribution.set_distribution(current)

    # -- collectives -------------------------------------------------------------------------------------

    def agree(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on process 0 and give its JSON result (or its error, raised again) to every process."""
        if not self.multi_process:
            return fn()
        payload: dict[str, Any]
        if self.is_writer:
            try:
                payload = {"ok": fn()}
            except AltI2VError as e:
                payload = {"error": str(e), "usage": isinstance(e, UsageError)}
        else:
            payload = {}
        got = json.loads(self._broadcast_bytes(json.dumps(payload).encode() if self.is_writer else b""))
        if "error" in got:
            raise (UsageError if got["usage"] else AltI2VError)(got["error"])
        return got["ok"]

    def _broadcast_bytes(self, data: bytes) -> bytes:
        from jax.experimental import multihost_utils

        n = multihost_utils.broadcast_one_to_all(np.array([len(data)], np.int64), is_source=self.is_writer)
        buf = np.zeros(int(n[0]), np.uint8)
        if self.is_writer:
            buf[:] = np.frombuffer(data, np.uint8)
        out = multihost_utils.broadcast_one_to_all(buf, is_source=self.is_writer)
        return np.asarray(out, np.uint8).tobytes()

    def sync_variables(self, variables: Sequence[Any], values: Sequence[np.ndarray] | None) -> None:
        """Give ``variables`` (on every process, same structure) process 0's ``values``: one starting point
        for all replicas, whether fresh weights or a checkpoint only process 0 can read."""
        if self.is_writer:
            if values is None or len(values) != len(variables):
                raise AltI2VError(f"cannot start the replicas: {len(variables)} variables, "
                                  f"{0 if values is None else len(values)} values")
            for var, val in zip(variables, values):
                if tuple(var.shape) != tuple(np.shape(val)):
                    raise AltI2VError(f"checkpoint variable {var.path} has shape {np.shape(val)}, the model "
                                      f"{tuple(var.shape)}")
        if self.multi_process:
            from jax.experimental import multihost_utils

            local = ([np.asarray(v) for v in values] if self.is_writer else
                     [np.zeros(tuple(v.shape), _np_dtype(v)) for v in variables])
            values = multihost_utils.broadcast_one_to_all(local, is_source=self.is_writer)
        for var, val in zip(variables, values):
            var.assign(np.asarray(val))

    # -- data --------------------------------------------------------------------------------------------

    def dataset(self, ds: Any, name: str = "train") -> Any:
        """What ``fit`` reads: ``ds`` itself on one device, else this process's slice of each global batch."""
        if self.distribution is None:
            return ds
        return ProcessSlice(ds, self.process_index, self.process_count, self.replicas,
                            record_log=self.config.record_log if name == "train" else None)

    def open_store(self, data_dir: Path, **kw: Any) -> Any:
        """The store for this process: the store itself, or with several processes a private view of it
        (LevelDB lets one process open a database; processes sharing a host each read their own view)."""
        from ..store import open_store
        from ..store.views import open_view

        if not self.multi_process:
            return open_store(data_dir, **kw)
        return open_view(data_dir, self._held, timeout=self.config.peer_timeout, **kw)

    # -- failures ----------------------------------------------------------------------------------------

    @contextmanager
    def guard(self) -> Iterator["Cluster"]:
        """Around a distributed run: an error here is told to the other processes (so they stop at once),
        a failed collective is explained (which process died), and the heartbeat stops at the end."""
        try:
            yield self
        except BaseException as e:
            if self.multi_process:
                err = e if isinstance(e, PeerError) else (self.explain(e) or e)
                self._fail(str(err) if isinstance(err, AltI2VError) else f"{type(err).__name__}: {err}")
                if err is not e:
                    raise err from None
            raise
        finally:
            self._held.close()
            if self._watchdog is not None:
                self._watchdog.stop(done=True)

    def explain(self, exc: BaseException) -> PeerError | None:
        """After a failed step: which other process died or failed (None when none did)."""
        if self._watchdog is None or isinstance(exc, AltI2VError) or not isinstance(exc, Exception):
            return None  # our own clear error, or Ctrl-C: nothing to find out
        return self._watchdog.diagnose(wait=DEAD_AFTER_ERROR_SECONDS * 2 + 2)

    def _fail(self, message: str) -> None:
        if self._watchdog is not None:
            self._watchdog.publish_failure(message)
        FAILED.set()


def _np_dtype(var: Any) -> np.dtype:
    import keras

    return np.dtype(keras.backend.standardize_dtype(var.dtype))


def start(config: DistConfig | None = None, *, quiet: bool = False) -> Cluster:
    """This process's :class:`Cluster` for ``config`` (default: all local devices of the JAX backend).

    On one device (``--distribute none``, a single device, or a backend other than JAX) there is no
    distribution at all: training runs exactly as it always has. Several processes call
    ``jax.distributed.initialize`` (once per process) before JAX touches a device; ``quiet`` drops the
    line that says a process is joining.
    """
    import keras

    config = config or DistConfig()
    backend = keras.backend.backend()
    wants_many = config.multi_process or (config.devices or 1) > 1
    if config.distribute == "none":
        if wants_many:
            raise UsageError("--distribute none trains on one device; drop --devices / --num-processes")
        return Cluster(config)
    if backend != "jax":
        if wants_many:
            raise UsageError(f"training on several devices or processes runs on JAX (keras.distribution); "
                             f"this is the {backend} backend: set KERAS_BACKEND=jax")
        return Cluster(config)
    import jax

    if config.multi_process:
        join(config, quiet)
    local = jax.local_devices()
    per = config.devices or len(local)
    if per > len(local):
        raise UsageError(f"--devices {per}: this process sees {len(local)} "
                         f"{local[0].platform.upper()} device(s)")
    count, index = jax.process_count(), jax.process_index()
    if count == 1 and per == 1:
        return Cluster(config)
    by_process: dict[int, list] = {}
    for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(d.process_index, []).append(d)
    if count > 1:
        from jax.experimental import multihost_utils

        pers = np.asarray(multihost_utils.process_allgather(np.array([per], np.int64))).reshape(-1)
        if len(set(int(p) for p in pers)) != 1:
            raise UsageError(f"every process must use the same number of devices; got {list(map(int, pers))} "
                             "(give the same --devices to all, or leave it out)")
    devices = [d for p in sorted(by_process) for d in by_process[p][:per]]
    mesh = keras.distribution.DeviceMesh(shape=(len(devices),), axis_names=["batch"],
                                         devices=[f"{d.platform}:{d.id}" for d in devices])
    distribution = keras.distribution.DataParallel(device_mesh=mesh, auto_shard_dataset=False)
    cluster = Cluster(config, process_index=index, process_count=count, devices=devices,
                      distribution=distribution)
    if count > 1:
        cluster._watchdog = STARTED["watchdog"]
        cluster._watchdog.start_watching()
    return cluster


# ---------------------------------------------------------------------------------------------------------
# Reading: one slice of every global batch per process


class ProcessSlice(PyDataset):
    """This process's rows of every global batch of a ``StoreDataset``.

    Every global batch has ``batch_size`` rows (the last one padded with rows of weight 0); process ``p``
    of ``P`` reads rows ``p * batch_size / P`` to ``(p + 1) * batch_size / P`` only, with the augmentation,
    labels and weights they have in the whole batch. ``record_log`` (a folder) gets ``records-p<P>.txt``
    lines ``epoch batch key`` of the real records this process fed.
    """

    def __init__(self, ds: Any, process_index: int, process_count: int, replicas: int, *,
                 record_log: str | None = None):
        super().__init__(workers=getattr(ds, "threads", ds.workers), use_multiprocessing=False,
                         max_queue_size=getattr(ds, "max_queue_size", 8))
        if ds.batch_size % replicas:
            raise UsageError(f"--batch-size {ds.batch_size} cannot be split evenly over {replicas} devices; "
                             f"use a multiple of {replicas}")
        self.ds = ds
        self.process_index, self.process_count, self.replicas = process_index, process_count, replicas
        self.rows = ds.batch_size // process_count
        self._log_path = (Path(record_log) / f"records-p{process_index}.txt") if record_log else None
        self._logged: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ds)

    @property
    def num_images(self) -> int:
        return self.ds.num_images

    def part(self, index: int) -> tuple[int, int]:
        """``(lo, hi)``: the rows of global batch ``index`` this process reads."""
        if index < 0 or index >= len(self):
            raise IndexError(index)
        lo = self.process_index * self.rows
        return lo, lo + self.rows

    def __getitem__(self, index: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        lo, hi = self.part(index)
        batch = self.ds.read(index, lo, hi)
        if self._log_path is not None:
            self._log(index, lo, hi)
        return batch

    def _log(self, index: int, lo: int, hi: int) -> None:
        epoch = int(self.ds.epoch)
        with self._lock:
            if (epoch, index) in self._logged:
                return
            self._logged.add((epoch, index))
            idx, n = self.ds.padded_indices(index)
            lines = "".join(f"{epoch} {index} {self.ds.keys[i].decode()}\n" for i in idx[lo:min(hi, n)])
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._log_path, "a", encoding="utf-8") as f:
                f.write(lines)

    def on_epoch_end(self) -> None:
        self.ds.on_epoch_end()

    def close(self) -> None:
        self.ds.close()


__all__ = ["DistConfig", "Cluster", "PeerError", "ProcessSlice", "start", "settings_from_env", "DISTRIBUTE_MODES",
           "ENV_VARS"]
