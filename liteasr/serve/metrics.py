"""Prometheus metrics of one server, in its own registry (two servers in one process never share counters)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .scheduler import Metrics

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class ServerMetrics(Metrics):
    """Requests, errors by type, audio seconds, batch sizes, queue wait, latencies, queue depth."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("liteasr_requests", "Finished HTTP requests to the audio endpoints",
                                ["endpoint", "model", "status"], registry=r)
        self.errors = Counter("liteasr_errors", "Error responses by OpenAI error type and code",
                              ["type", "code"], registry=r)
        self.audio_seconds = Counter("liteasr_audio_seconds", "Seconds of audio transcribed", ["model"], registry=r)
        self.windows = Counter("liteasr_windows", "30-s windows decoded (padding rows excluded)", ["model"],
                               registry=r)
        self.batch_size = Histogram("liteasr_batch_size", "Windows per decoder call (padding excluded)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.padding = Counter("liteasr_padding_rows", "Rows added to reach a batch bucket", registry=r)
        self.batch_seconds = Histogram("liteasr_batch_seconds", "Wall time of one decoder call",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.wait = Histogram("liteasr_queue_wait_seconds", "Time a ready window waited for a batch",
                              buckets=WAIT_BUCKETS, registry=r)
        self.latency = Histogram("liteasr_request_latency_seconds", "Request latency, upload read to last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queued = Gauge("liteasr_queued_requests", "Requests waiting for their first window", registry=r)
        self.active = Gauge("liteasr_active_requests", "Requests with windows being decoded", registry=r)

    # Metrics (called by the scheduler's worker)
    def batch(self, model: str, size: int, padded: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.windows.labels(model).inc(size)
        self.padding.inc(padded - size)
        self.batch_seconds.observe(seconds)

    def queue_wait(self, seconds: float) -> None:
        self.wait.observe(seconds)

    def depth(self, queued: int, active: int) -> None:
        self.queued.set(queued)
        self.active.set(active)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
