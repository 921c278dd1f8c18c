"""`liteasr serve`: an OpenAI-compatible speech-to-text server that batches windows across requests.

    from liteasr.serve import ServeOptions, serve
    serve(["tiny.en"], device="cpu", port=8000, options=ServeOptions(api_key="secret"))

app.py (routes, limits, errors, uvicorn), protocol.py (OpenAI's fields and shapes), scheduler.py (the batching
worker that owns the models), metrics.py (Prometheus). Needs the `serve` extra (fastapi, uvicorn,
python-multipart, prometheus-client).
"""

from .app import ServeOptions, build_app, load_models, serve
from .scheduler import BatchOptions, Scheduler, power_of_two_buckets

__all__ = ["serve", "build_app", "load_models", "ServeOptions", "BatchOptions", "Scheduler", "power_of_two_buckets"]
