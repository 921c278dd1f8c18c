"""The Ray Data pipeline behind corpus transcription and evaluation:

    entries (id, path, language) -> read_pieces in CPU tasks: decode, resample, split at quiet points
        -> Transcriber actors (a pool of `workers`, each with its model loaded once) -> pieces' results
        -> the driver stitches each file's pieces back in order as soon as the last one arrives.

A file longer than options.chunk_s becomes several pieces that any workers may take; the split and the
stitch are liteasr.transcribe's own (`split_points`, `stitch`), so the result equals a single-process
`transcribe(..., chunk_s=…)`. Without chunk_s every file is one piece (Whisper's seek keeps its windows
sequential): files, not windows, are then what the workers share.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass


from ..transcribe import TranscribeOptions, read_audio, split_points, stitch
from .cluster import RayOptions, connect
from .transcriber import ModelSpec, Transcriber


@dataclass(frozen=True)
class Entry:
    """One input file of a run: its id (unique), where its audio is, and a language to force (None: options')."""

    id: str
    path: str
    language: str | None = None


class PieceError(RuntimeError):
    """A file that could not be read or transcribed; the message names the file and the cause."""


def read_pieces(row: dict, chunk_s: float | None) -> list[dict]:
    """CPU task: one entry row -> its pieces, each with its float32 16-kHz samples as bytes (Arrow carries bytes
    of any length without a tensor extension). An unreadable file gives one row carrying its error."""
    base = {"id": row["id"], "path": row["path"], "language": row["language"]}
    try:
        audio = read_audio(row["path"])
        bounds = split_points(audio, chunk_s) if chunk_s else [(0, len(audio))]
    except Exception as e:  # a bad file is a row with an error, never a failed task
        return [base | {"first": 0, "num_samples": 0, "pieces": 1, "audio": b"", "error": f"{type(e).__name__}: {e}"}]
    return [base | {"first": a, "num_samples": len(audio), "pieces": len(bounds), "audio": audio[a:b].tobytes(),
                    "error": ""} for a, b in bounds]


def transcribe_stream(spec: ModelSpec, entries: list[Entry], options: TranscribeOptions,
                      ray_options: RayOptions) -> Iterator[tuple[str, dict | PieceError]]:
    """Transcribe `entries` on Ray; yields (id, result) as each file is finished (any order), or (id, PieceError)
    for a file that could not be read or transcribed. Each id is yielded exactly once. A worker that dies has its
    batch retried on a restarted worker (Ray Data's actor restarts); the rows of a failed attempt never arrive.
    Results are liteasr.transcribe's {"text", "language", "segments", "duration"}."""
    import ray

    connect(ray_options)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller shows files done and the ETA
    if not entries:
        return
    items = [{"id": e.id, "path": str(e.path), "language": e.language or ""} for e in entries]
    # Small blocks (4 files each, at most 4096 blocks): the first batches reach the workers early.
    ds = ray.data.from_items(items, override_num_blocks=min(4096, max(1, len(items) // 4)))
    ds = ds.flat_map(read_pieces, fn_kwargs={"chunk_s": options.chunk_s}, num_cpus=1)
    ds = ds.map_batches(Transcriber, fn_constructor_args=(spec, options), batch_size=options.batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=ray_options.workers),
                        num_cpus=ray_options.cpus_per_worker, num_gpus=ray_options.gpus_per_worker or None)
    parts: dict[str, dict[int, dict]] = {}
    finished: set[str] = set()
    for row in ds.iter_rows():
        fid = str(row["id"])
        if fid in finished:
            continue
        if row["error"]:
            finished.add(fid)
            parts.pop(fid, None)
            yield fid, PieceError(str(row["error"]) if row["path"] in row["error"] else f"{row['path']}: {row['error']}")
            continue
        got = parts.setdefault(fid, {})
        got[int(row["first"])] = json.loads(row["result"])
        if len(got) == int(row["pieces"]):
            finished.add(fid)
            del parts[fid]
            yield fid, stitch(list(got.items()), int(row["num_samples"]))
