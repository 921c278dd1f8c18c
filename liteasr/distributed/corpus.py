"""Corpus transcription: a manifest or a directory of audio files in, one result row per file out, resumable.

Layout of the output directory:

    files/<id>.json     one row per finished file, written atomically the moment its last piece is stitched
    results.jsonl       every row of the corpus in manifest order, written (atomically) at the end of a run
    results.parquet     the same rows as Parquet

Exactly once: the driver is the only writer; it skips ids whose `files/<id>.json` exists, writes each other id
once (the stream yields an id once), and the final files are rebuilt from `files/`. A crash of the driver loses
only unfinished files, which the next run with the same command transcribes; a crash of a worker is retried by
Ray. A file that cannot be read or transcribed gets a row with its `error` and the run goes on.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from .. import atomic
from ..transcribe import TranscribeOptions
from .cluster import RayOptions
from .pipeline import Entry, transcribe_stream
from .transcriber import ModelSpec, options_json

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".mp4", ".aac")
COLUMNS = ("id", "path", "text", "segments", "language", "duration", "model", "options", "error")


@dataclass(frozen=True)
class Summary:
    """What one run did: files in the corpus, written by this run, skipped (done before), failed (all runs)."""

    total: int
    written: int
    skipped: int
    failed: int
    seconds: float
    jsonl: Path
    parquet: Path


def read_corpus(source: str | os.PathLike) -> list[Entry]:
    """The entries of a JSON-lines manifest ({"id", "audio"[, "lang"], …} per line; audio relative to the
    manifest) or of a directory (every audio file below it, sorted; id = path relative to it). Bad lines and
    duplicate ids are reported together, naming file:line."""
    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        return [Entry(str(p.relative_to(src)), str(p)) for p in files]
    entries, errors, seen = [], [], {}
    for lineno, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{src}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: bad JSON ({e.msg})")
            continue
        bad = [f for f in ("id", "audio") if not isinstance(row.get(f), str) or not row[f]] if isinstance(row, dict) \
            else ["id", "audio"]
        if row.get("lang") is not None and not isinstance(row.get("lang"), str):
            bad.append("lang")
        if bad:
            errors += [f"{where}: field '{f}' missing or not a non-empty string" for f in bad]
        elif row["id"] in seen:
            errors.append(f"{where}: field 'id' duplicates line {seen[row['id']]} ({row['id']})")
        else:
            seen[row["id"]] = lineno
            entries.append(Entry(row["id"], str(src.parent / row["audio"]), row.get("lang")))
    if errors:
        raise ValueError(f"invalid manifest {src} ({len(errors)} problems):\n  " + "\n  ".join(errors[:20]))
    return entries


def transcribe_corpus(spec: ModelSpec, source: str | os.PathLike, output_dir: str | os.PathLike,
                      options: TranscribeOptions = TranscribeOptions(), ray_options: RayOptions = RayOptions(),
                      progress: bool = True) -> Summary:
    """Transcribe every file of `source` (see read_corpus) on Ray into `output_dir` (see the module docstring),
    skipping files a previous run finished. Rows: id, path, text, segments, language, duration, model, options
    (JSON), error (None, or why the file failed; its text is then empty)."""
    from tqdm import tqdm

    start = time.perf_counter()
    out = Path(output_dir)
    entries = read_corpus(source)
    rows_dir = out / "files"
    rows_dir.mkdir(parents=True, exist_ok=True)
    done = {unquote(p.name[:-5]) for p in rows_dir.glob("*.json")}
    todo = [e for e in entries if e.id not in done]
    by_id = {e.id: e for e in todo}
    common = {"model": spec.name, "options": options_json(options)}
    written = 0
    # tqdm's rate and remaining time are the ETA: files finished per second over the run so far.
    with tqdm(total=len(todo), unit="file", desc="transcribe", disable=not progress, smoothing=0) as bar:
        for fid, result in transcribe_stream(spec, todo, options, ray_options):
            e = by_id[fid]
            if isinstance(result, Exception):
                row = {"id": fid, "path": e.path, "text": "", "segments": [], "language": None, "duration": None,
                       **common, "error": str(result)}
            else:
                row = {"id": fid, "path": e.path, **result, **common, "error": None}
            atomic.write_text(rows_dir / f"{_file_name(fid)}.json", json.dumps(row, ensure_ascii=False) + "\n")
            written += 1
            bar.update()
    rows = [json.loads((rows_dir / f"{_file_name(e.id)}.json").read_text(encoding="utf-8")) for e in entries]
    jsonl, parquet = out / "results.jsonl", out / "results.parquet"
    atomic.write_text(jsonl, "".join(json.dumps({k: r[k] for k in COLUMNS}, ensure_ascii=False) + "\n" for r in rows))
    _write_parquet(parquet, rows)
    return Summary(len(entries), written, len(entries) - len(todo), sum(r["error"] is not None for r in rows),
                   time.perf_counter() - start, jsonl, parquet)


def _file_name(fid: str) -> str:
    """A file name that gives the id back (percent-encoding: '/' and every other unsafe character escaped)."""
    return quote(fid, safe="")


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    segment = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("text", pa.string()),
                         ("tokens", pa.list_(pa.int64())), ("avg_logprob", pa.float64()),
                         ("no_speech_prob", pa.float64())])
    schema = pa.schema([("id", pa.string()), ("path", pa.string()), ("text", pa.string()),
                        ("segments", pa.list_(segment)), ("language", pa.string()), ("duration", pa.float64()),
                        ("model", pa.string()), ("options", pa.string()), ("error", pa.string())])
    table = pa.Table.from_pylist([{k: r[k] for k in COLUMNS} for r in rows], schema=schema)
    with atomic.file(path) as tmp:
        pq.write_table(table, tmp)
