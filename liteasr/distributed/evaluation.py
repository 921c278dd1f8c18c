"""`liteasr eval --ray`: the clips of a manifest transcribed by the corpus pipeline and scored by
liteasr.eval.evaluate itself, so the report has the same fields, rates and failure accounting."""

from __future__ import annotations

from collections.abc import Sequence

from ..eval import Clip, evaluate
from .cluster import RayOptions
from .pipeline import Entry, transcribe_stream
from .transcriber import ModelSpec


def evaluate_ray(spec: ModelSpec, clips: Sequence[Clip], batch_size: int = 8, ray_options: RayOptions = RayOptions(),
                 detect_language: bool = False, progress: bool = True) -> dict:
    """liteasr.eval.evaluate's report of `clips` transcribed on Ray (`batch_size` windows per decoder call in each
    worker). Each clip's manifest language is forced unless `detect_language`, as `eval.transcribe_clips` does;
    clips that fail are listed and left out of the rates, as there. The whole set goes to the pipeline in one
    call, so wall_s runs from submitting it to the last transcript: starting the workers and loading their
    models included."""
    from ..transcribe import TranscribeOptions

    clips = list(clips)
    options = TranscribeOptions(batch_size=batch_size)

    def run(batch: list[Clip]) -> list[str | Exception]:
        entries = [Entry(c.id, str(c.audio), None if detect_language else c.lang) for c in batch]
        out = {cid: r if isinstance(r, Exception) else r["text"]
               for cid, r in transcribe_stream(spec, entries, options, ray_options)}
        return [out[c.id] for c in batch]

    report = evaluate(run, clips, batch_size=max(1, len(clips)), progress=progress)
    report["batch_size"] = batch_size  # evaluate saw one call with every clip; the decoder batches are these
    return report
