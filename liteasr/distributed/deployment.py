"""`liteasr serve --ray`: the server of liteasr.serve as a Ray Serve deployment.

Each replica is one whole `liteasr serve` app (build_app: routes, limits, the batching Scheduler) around the
models it loads itself, on one GPU (gpus_per_worker=1) or a CPU slot; Ray's HTTP proxy spreads requests over
the replicas. Inside a replica the cross-request batching is the plain server's. Backpressure has two levels:
a replica takes at most `options.batch.max_queue` requests at a time (max_ongoing_requests), so its own
scheduler never overflows; beyond what all replicas hold, Ray queues up to `max_queued_requests` at the
router and answers the rest 429 with Retry-After (Ray's BackpressureConfig), as the plain server does.
"""

from __future__ import annotations

from ray import serve

from ..serve import ServeOptions, build_app, load_models
from .cluster import RayOptions, connect


@serve.ingress()
class Replica:
    """One replica: the app of `liteasr serve` over `models`, which it loads on its own device at startup."""

    def __init__(self, models: list[str], device: str, dtype, options: ServeOptions) -> None:
        self.asgi = build_app(lambda: load_models(models, device, dtype), options)

    def __serve_build_asgi_app__(self):
        return self.asgi


def serve_ray(models: list[str], device: str = "cpu", dtype=None, host: str = "127.0.0.1",
              port: int = 8000, options: ServeOptions = ServeOptions(), ray_options: RayOptions = RayOptions(),
              max_queued_requests: int | None = None, blocking: bool = True) -> None:
    """Serve `models` (names or directories; dtype: a torch dtype or None, as liteasr.serve.serve) on Ray with
    `ray_options.workers` replicas (each with cpus_per_worker CPUs and
    gpus_per_worker GPUs: 1 for one replica per GPU) behind Ray's proxy on host:port. Requests beyond the
    replicas' capacity wait at the router, up to `max_queued_requests` (default: one replica's
    options.batch.max_queue), then get 429. blocking=False returns once the replicas are up (tests)."""
    from ray.serve.config import BackpressureConfig

    if len(set(models)) != len(models):
        raise ValueError(f"--model: a model is named twice ({', '.join(models)})")
    connect(ray_options)
    serve.start(http_options={"host": host, "port": port})
    deployment = serve.deployment(
        Replica, name="liteasr", num_replicas=ray_options.workers,
        ray_actor_options={"num_cpus": ray_options.cpus_per_worker, "num_gpus": ray_options.gpus_per_worker},
        max_ongoing_requests=options.batch.max_queue,
        max_queued_requests=options.batch.max_queue if max_queued_requests is None else max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=options.retry_after_s))
    serve.run(deployment.bind(models, device, dtype, options), name="liteasr", route_prefix="/", blocking=blocking)
    # blocking: serve.run returns on Ctrl-C after shutting the application down
