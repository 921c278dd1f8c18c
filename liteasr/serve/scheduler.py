"""The batching scheduler: one thread owns the model(s) and decodes batches of 30-s windows drawn from every
pending request, so concurrent clients share decoder calls.

Each request is a `Job` (liteasr.transcribe): it offers one window at a time (Whisper's seek makes window n+1
depend on window n), so a long file contributes one window per batch and interleaves with short ones instead
of blocking them. A batch holds windows of one model and one DecodingOptions, oldest first; when the worker is
idle it waits up to `max_wait_ms` for a batch to fill, and it pads a batch up to the next of `buckets` (the
batch sizes a CUDA runtime captures graphs for) with copies of a window whose results it drops.

The HTTP side is asyncio; it talks to the worker through `Request`: `submit` hands audio in, and the worker
posts ("segments", [...]), ("done", result) or ("error", exception) onto the request's asyncio queue with
`loop.call_soon_threadsafe`. A decode failure is retried window by window, so a bad window fails only its
own request.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..transcribe import Job, TranscribeOptions, Window, compression_ratio, decode_windows


@dataclass(frozen=True)
class BatchOptions:
    """How the scheduler forms batches and bounds its queue."""

    max_batch_size: int = 8  # windows per decoder call (1: no batching across requests)
    max_wait_ms: float = 10.0  # an idle worker waits this long for a first batch to fill
    max_queue: int = 64  # requests admitted at a time (queued + decoding); beyond it: QueueFull (HTTP 429)
    buckets: tuple[int, ...] | None = None  # pad batches up to these sizes (CUDA graphs); None: no padding

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_wait_ms < 0:
            raise ValueError(f"BatchOptions: max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0 "
                             f"(got {self.max_batch_size}, {self.max_queue}, {self.max_wait_ms})")
        if self.buckets is not None and max(self.buckets) < self.max_batch_size:
            raise ValueError(f"BatchOptions: the largest bucket {max(self.buckets)} is below max_batch_size "
                             f"{self.max_batch_size}")


def power_of_two_buckets(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, … up to max_batch_size (included even when not a power of two): few sizes, few CUDA graphs."""
    sizes = [b for b in (2 ** i for i in range(max_batch_size.bit_length())) if b < max_batch_size]
    return (*sizes, max_batch_size)


class QueueFull(Exception):
    """The scheduler holds max_queue requests already."""


class ShuttingDown(Exception):
    """The scheduler is stopping: no new requests, and unfinished ones fail with this."""


@dataclass(eq=False)
class Request:
    """One transcription, as both sides see it. The worker owns `job`/`window`; `events` belongs to the loop."""

    id: int
    model: str
    audio: np.ndarray  # (T,) float32 16 kHz
    options: TranscribeOptions
    name: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the HTTP side (disconnect, timeout); the worker drops the request
    finished: bool = False  # its slot is freed and its last event posted (exactly once)
    job: Job | None = None
    window: Window | None = None  # the next window to decode, computed once
    ready_at: float = 0.0  # when `window` became decodable (queue-wait metric)
    eligible_at: float = 0.0  # the clock of the max-wait rule (earlier than ready_at for continuation windows)

    def cancel(self) -> None:
        """Drop the request's pending windows (a window already in a batch finishes; its result is discarded)."""
        self.cancelled = True

    def post(self, kind: str, payload) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Metrics:
    """What the scheduler reports; `liteasr.serve.metrics.ServerMetrics` implements it with Prometheus."""

    def batch(self, model: str, size: int, padded: int, seconds: float) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def depth(self, queued: int, active: int) -> None: ...


class Scheduler:
    """Owns `models` ({name: Whisper or CudaRuntime}, set later by `start` when loading is slow) and one worker
    thread. `submit` is called from the event loop's thread; everything else on the models runs on the worker."""

    def __init__(self, options: BatchOptions = BatchOptions(), metrics: Metrics | None = None) -> None:
        self.options = options
        self.metrics = metrics or Metrics()
        self.models: dict = {}
        self._cond = threading.Condition()
        self._incoming: deque[Request] = deque()  # submitted, Job not built yet (the worker builds it)
        self._active: list[Request] = []  # Jobs with windows left
        self._admitted = 0  # requests holding a queue slot
        self._ids = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- the event-loop side -----------------------------------------------------------------------

    def start(self, models: dict) -> None:
        """Serve `models` from now on: start the worker thread."""
        self.models = dict(models)
        self._thread = threading.Thread(target=self._run, name="liteasr-scheduler", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._thread is not None and not self._stopping

    def depth(self) -> dict:
        """{"queued": requests not started, "active": requests decoding, "admitted": slots taken}."""
        with self._cond:
            return {"queued": len(self._incoming), "active": len(self._active), "admitted": self._admitted}

    def reserve(self) -> None:
        """Take a queue slot for a request about to be read (raises QueueFull or ShuttingDown); `release` or
        `submit` it."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._admitted >= self.options.max_queue:
                raise QueueFull(f"{self._admitted} requests are queued or decoding (max_queue "
                                f"{self.options.max_queue})")
            self._admitted += 1

    def release(self) -> None:
        """Give back a slot taken by `reserve` for a request that never reached `submit`."""
        with self._cond:
            self._admitted -= 1

    def submit(self, model: str, audio: np.ndarray, options: TranscribeOptions, name: str) -> Request:
        """Queue a reserved request (its slot now belongs to the scheduler); its events arrive on
        `request.events` in the calling loop."""
        req = Request(next(self._ids), model, audio, options, name, asyncio.get_running_loop())
        with self._cond:
            if self._stopping:  # the caller still holds the slot and releases it
                raise ShuttingDown("the server is shutting down")
            self._incoming.append(req)
            self._cond.notify()
        return req

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker; requests not finished get ("error", ShuttingDown)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            left = list(self._incoming) + self._active
            self._incoming.clear()
            self._active.clear()
        for req in left:
            self._finish(req, "error", ShuttingDown("the server shut down before this request finished"))

    # --- the worker -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._incoming and not self._active:
                    self._cond.wait()
                if self._stopping:
                    return
                incoming = list(self._incoming)
                self._incoming.clear()
            for req in incoming:
                self._open(req)
            batch = self._next_batch()
            if batch:
                self._decode(batch)

    def _open(self, req: Request) -> None:
        """Build the request's Job (log-mel on the model's device: on the worker, like every model call)."""
        if req.cancelled:
            return self._finish(req, None, None)
        try:
            req.job = Job(self.models[req.model], req.audio, req.options, req.name)
        except Exception as e:  # a bad input fails alone
            return self._finish(req, "error", e)
        req.audio = None  # the Job holds it now
        with self._cond:
            self._active.append(req)
        self._refill(req, time.monotonic(), time.monotonic())

    def _refill(self, req: Request, now: float, eligible: float) -> None:
        """Compute the request's next window, or finish it when none is left."""
        try:
            req.window = req.job.window()
        except Exception as e:
            return self._finish(req, "error", e)
        if req.window is None:
            return self._finish(req, "done", req.job.result())
        req.ready_at, req.eligible_at = now, eligible

    def _next_batch(self) -> list[Request]:
        """The requests whose windows form the next batch: the group (model, DecodingOptions) of the oldest
        window, oldest first, at most max_batch_size. An idle worker waits up to max_wait_ms for it to fill."""
        for req in [r for r in self._active if r.cancelled]:
            self._finish(req, None, None)
        if not self._active:
            return []
        oldest = min(self._active, key=lambda r: r.eligible_at)
        key = (oldest.model, oldest.window.options)
        group = sorted((r for r in self._active if (r.model, r.window.options) == key), key=lambda r: r.eligible_at)
        wait = oldest.eligible_at + self.options.max_wait_ms / 1000 - time.monotonic()
        if len(group) < self.options.max_batch_size and wait > 0:
            with self._cond:  # woken early by a new submission; the loop then re-plans
                self._cond.wait(wait)
            return []
        return group[: self.options.max_batch_size]

    def _decode(self, batch: list[Request]) -> None:
        start = time.monotonic()
        for req in batch:
            self.metrics.queue_wait(start - req.ready_at)
        model_name = batch[0].model
        windows = [r.window for r in batch]
        size = self._bucket(len(windows))
        padded = windows + [windows[-1]] * (size - len(windows))  # pad rows: same window, results dropped
        results = self._decode_isolated(self.models[model_name], padded)[: len(windows)]
        end = time.monotonic()
        self.metrics.batch(model_name, len(windows), size, end - start)
        for req, result in zip(batch, results):
            if req.cancelled:
                self._finish(req, None, None)
            elif isinstance(result, Exception):
                self._finish(req, "error", result)
            else:
                self._advance(req, result, end, start)
        with self._cond:
            self.metrics.depth(len(self._incoming), len(self._active))

    def _advance(self, req: Request, result, now: float, batch_start: float) -> None:
        seek = req.job.seek
        try:
            segments = req.job.advance(result)
        except Exception as e:
            return self._finish(req, "error", e)
        for seg in segments:  # what OpenAI's verbose_json segments carry beyond liteasr's own
            seg.setdefault("seek", seek)
            seg.setdefault("temperature", getattr(result, "temperature", 0.0))
            seg.setdefault("compression_ratio", compression_ratio(result.text))
        if segments:
            req.post("segments", segments)
        # The next window has waited since this batch started (it could not start earlier): a continuation
        # never waits for the batch to fill, only windows of a worker that was idle do.
        self._refill(req, now, batch_start)

    def _bucket(self, n: int) -> int:
        buckets = self.options.buckets
        return n if buckets is None else min(b for b in buckets if b >= n)

    @staticmethod
    def _decode_isolated(model, windows: list[Window]) -> list:
        """decode_windows on the batch; on failure, window by window, so that only bad windows fail."""
        try:
            return decode_windows(model, windows)
        except Exception as e:
            if len(windows) == 1:
                return [e]
        out = []
        for w in windows:
            try:
                out.append(decode_windows(model, [w])[0])
            except Exception as e1:
                out.append(e1)
        return out

    def _finish(self, req: Request, kind: str | None, payload) -> None:
        """Remove the request, free its slot and post its last event (none for a cancelled request)."""
        with self._cond:
            if req.finished:
                return
            req.finished = True
            if req in self._active:
                self._active.remove(req)
            self._admitted -= 1
        req.window = None
        if kind is not None:
            req.post(kind, payload)

