"""One thread owns the model: concurrent requests' forward passes are batched, anything else (Grad-CAM)
runs between batches, so no two calls ever reach the model at once on any Keras backend.

Requests hand in already decoded images and get a :class:`concurrent.futures.Future`; the thread takes
whatever is waiting (up to ``max_batch``), runs one forward pass per kind of work and answers each.
Batching needs no waiting window: while one batch is in the model, the next requests queue up.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

KINDS = ("tags", "embed")


@dataclass
class _Job:
    kind: str  # "tags", "embed" or "call"
    future: Future
    image: np.ndarray | None = None
    call: Callable[[], Any] | None = None


@dataclass
class EngineStats:
    """Forward passes and images so far (``mean_batch`` tells how much batching happened)."""

    batches: int = 0
    images: int = 0
    calls: int = 0
    largest_batch: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"batches": self.batches, "images": self.images, "calls": self.calls,
                    "largest_batch": self.largest_batch,
                    "mean_batch": round(self.images / self.batches, 2) if self.batches else None}


class ModelEngine:
    """Serialises every use of a :class:`~alt_i2v.tagging.tagger.Tagger` onto one thread and batches its
    forward passes: ``tags(image)`` (probabilities, like ``predict_tags``), ``embed(image)`` (the
    L2-normalised embedding, like ``extract_embeddings``) and ``call(fn)`` (anything else)."""

    def __init__(self, tagger: Any, max_batch: int = 32):
        self.tagger = tagger
        self.max_batch = max(1, int(max_batch))
        self.stats = EngineStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="alt-i2v-model", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------ submitting
    def tags(self, image: np.ndarray) -> Future:
        """Future of the (T,) float32 probabilities of one loaded uint8 image (S, S, 3)."""
        return self._submit(_Job("tags", Future(), image=image))

    def embed(self, image: np.ndarray) -> Future:
        """Future of the (D,) L2-normalised embedding of one loaded image."""
        return self._submit(_Job("embed", Future(), image=image))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Future of ``fn()``, run on the model thread between batches."""
        return self._submit(_Job("call", Future(), call=fn))

    def _submit(self, job: _Job) -> Future:
        if self._closed:
            raise RuntimeError("the model engine is closed")
        self._queue.put(job)
        return job.future

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish what is queued, then stop the thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------------ the thread
    def _run(self) -> None:
        stop = False
        while not stop:
            job = self._queue.get()
            if job is None:
                break
            jobs = [job]
            while len(jobs) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                jobs.append(more)
            for kind in KINDS:
                group = [j for j in jobs if j.kind == kind and j.future.set_running_or_notify_cancel()]
                if group:
                    self._forward(kind, group)
            for j in jobs:
                if j.kind == "call" and j.future.set_running_or_notify_cancel():
                    self._settle(j.future, j.call)
                    with self.stats._lock:
                        self.stats.calls += 1

    def _forward(self, kind: str, group: list[_Job]) -> None:
        batch = np.stack([j.image for j in group])
        run = self.tagger.probabilities_of_arrays if kind == "tags" else self.tagger.embed_arrays
        try:
            out = run(batch)
        except BaseException as e:  # noqa: BLE001 - every waiting request gets the error, the thread lives on
            for j in group:
                j.future.set_exception(e)
            return
        with self.stats._lock:
            self.stats.batches += 1
            self.stats.images += len(group)
            self.stats.largest_batch = max(self.stats.largest_batch, len(group))
        for j, row in zip(group, out):
            j.future.set_result(row)

    @staticmethod
    def _settle(future: Future, fn: Callable[[], Any] | None) -> None:
        try:
            future.set_result(fn() if fn is not None else None)
        except BaseException as e:  # noqa: BLE001 - handed to the request that asked
            future.set_exception(e)


__all__ = ["ModelEngine", "EngineStats"]
