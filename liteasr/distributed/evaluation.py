"""`liteasr eval --ray`: the clips of a manifest transcribed by the corpus pipeline, scored as `liteasr eval`
scores them (liteasr.eval.score), so the report has the same fields and the same rates."""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..eval import Clip, score
from ..transcribe import TranscribeOptions
from .cluster import RayOptions
from .pipeline import Entry, transcribe_stream
from .transcriber import ModelSpec


def evaluate_ray(spec: ModelSpec, clips: Sequence[Clip], options: TranscribeOptions = TranscribeOptions(),
                 ray_options: RayOptions = RayOptions(), detect_language: bool = False,
                 progress: bool = True) -> dict:
    """Transcribe `clips` on Ray and score them: liteasr.eval.evaluate's report (wall_s, audio_s, rtfx and
    batch_size included). Each clip's manifest language is forced unless `detect_language`, as `liteasr eval`
    does. wall_s runs from submitting the pipeline to the last transcript, so it includes starting the workers
    and loading their models. A clip that cannot be transcribed raises, naming every such clip."""
    from tqdm import tqdm

    clips = list(clips)
    entries = [Entry(c.id, str(c.audio), None if detect_language else c.lang) for c in clips]
    texts: dict[str, str] = {}
    failed: list[str] = []
    t0 = time.perf_counter()
    with tqdm(total=len(clips), unit="clip", desc="transcribe", disable=not progress) as bar:
        for cid, result in transcribe_stream(spec, entries, options, ray_options):
            if isinstance(result, Exception):
                failed.append(str(result))
            else:
                texts[cid] = result["text"]
            bar.update()
    wall = time.perf_counter() - t0
    if failed:
        raise ValueError(f"{len(failed)} clip(s) could not be transcribed:\n  " + "\n  ".join(failed))
    report = score(clips, [texts[c.id] for c in clips])
    audio_s = sum(c.duration for c in clips)
    report.update(wall_s=wall, audio_s=audio_s, rtfx=audio_s / wall if wall > 0 else None,
                  batch_size=options.batch_size)
    return report
