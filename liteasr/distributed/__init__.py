"""liteasr beyond one machine, on Ray (the `ray` extra): corpus transcription and evaluation as a Ray Data
pipeline, calibration moments summed over workers, and the server as a Ray Serve deployment.

    cluster.py      RayOptions and connect(): a local Ray started here, or an existing cluster (address)
    transcriber.py  ModelSpec and Transcriber: the actor that loads a model (and its CUDA runtime) once
    pipeline.py     transcribe_stream(): manifest rows -> audio pieces (CPU tasks) -> transcriber pool -> results
    corpus.py       transcribe_corpus(): a manifest or directory to per-file results, JSONL and Parquet, resumable
    evaluation.py   evaluate_ray(): `liteasr eval`'s report with the pipeline doing the transcription
    calibration.py  calibrate_ray(): float64 moments accumulated on shards, summed on the driver
    deployment.py   serve_ray(): `liteasr serve` as a Ray Serve deployment, one replica per GPU

Ray is imported only inside this package; nothing else in liteasr needs it.
"""

from .cluster import RayOptions, connect
from .transcriber import ModelSpec

__all__ = ["RayOptions", "connect", "ModelSpec"]
