"""Transcription of files or arrays of any length, batched across inputs, and the output writers.

Each input is cut into 30-s windows the way Whisper does it: decode a window with timestamp
tokens, keep the segments it closed, and move the window start ("seek") to the last closed
timestamp. Windows of different inputs are decoded together in one batch, so many short files
cost one encoder call per batch. Audio of at most 30 s decodes without timestamps by default
(one segment), which is what transformers' short-form `generate` does as well.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, check_audio, load_audio, log_mel_spectrogram
from .decoding import DecodingOptions, DecodingResult, decode
from .model import Whisper
from .tokenizer import TIME_PRECISION, Tokenizer

# Windows that never reach the model (Whisper's log-mel is nearly level-invariant, so it "hears"
# faint hiss as loudly as speech and may hallucinate on it):
# - below -80 dBFS RMS: digital silence or dither;
# - below -60 dBFS RMS *and* steady: the 95th and 10th percentiles of the 25-ms frame energies
#   are less than 10 dB apart (white noise: ~1 dB; speech, with its syllables and pauses: 17 dB
#   or more on every speech-dev clip). A plain -60 dBFS gate silenced real read speech: FLEURS
#   has clips at -62 to -67 dBFS RMS.
SILENCE_RMS = 10 ** (-80 / 20)
QUIET_RMS = 10 ** (-60 / 20)
STEADY_DB = 10.0
OUTPUT_FORMATS = ("txt", "json", "srt", "vtt")


@dataclass(frozen=True)
class TranscribeOptions:
    """Options of `transcribe`; the CLI flags map onto these one to one."""

    language: str | None = None  # None: detect once per input (multilingual models)
    task: str = "transcribe"  # or "translate" (to English)
    batch_size: int = 8  # windows decoded together
    timestamps: bool | None = None  # None: only for inputs longer than one window
    no_speech_threshold: float = 0.6  # skip a window when P(no speech) is above this …
    logprob_threshold: float = -1.0  # … and the decoded text's average log-probability is below this,
    compression_ratio_threshold: float = 2.4  # … or its text is a repetition loop (gzip ratio above this)
    progress: bool = False
    max_active: int = 32  # inputs loaded at a time by transcribe_iter (bounded memory on any corpus)
    # Split inputs longer than this many seconds at their quietest points (`split_points`) and transcribe
    # each piece as an input of its own, stitched back in order (`stitch`). Whisper's seek makes the windows
    # of one input sequential; pieces are independent, so a corpus run can spread one long file over
    # several workers and still give exactly this single-process result. None: never split.
    chunk_s: float | None = None

    def __post_init__(self) -> None:
        if self.chunk_s is not None and self.chunk_s < 2 * N_SAMPLES / SAMPLE_RATE:
            raise ValueError(f"chunk_s must be at least {2 * N_SAMPLES // SAMPLE_RATE} s (got {self.chunk_s})")


@dataclass(frozen=True)
class Window:
    """One 30-s window of one Job, ready to decode. Windows with equal `options` can share a batch."""

    job: "Job"
    mel: torch.Tensor  # (n_mels, 3000)
    options: DecodingOptions
    language: str | None  # known (forced, or detected on an earlier window) or None: detect


class Job:
    """One input transcribed window by window, Whisper's way: `window()` gives the next window to decode
    (None when the input is finished), `advance(result)` turns its decoding into segments and moves the
    window start ("seek"). Loading happens at construction, so a bad input fails there, alone.

    Jobs of many inputs, even of many callers, can have their windows decoded together (`decode_windows`):
    `transcribe` does it for a list of inputs, the server across requests."""

    def __init__(self, model, item, options: "TranscribeOptions", name: str | None = None) -> None:
        self.name = name if name is not None else (str(item) if isinstance(item, (str, os.PathLike)) else "audio")
        self.options = options
        self.tokenizer: Tokenizer = model.tokenizer
        self.audio = read_audio(item)
        # Features are computed by torch; a non-torch model (the MLX twin) takes them from the CPU.
        self.mel = log_mel_spectrogram(self.audio, model.dims.num_mel_bins, padding=N_SAMPLES,
                                       device=_feature_device(model))  # (n_mels, frames + N_FRAMES)
        self.frames = self.mel.shape[-1] - N_FRAMES  # mel frames of real audio
        self.language = options.language if model.is_multilingual else "en"
        self.seek = 0
        self.segments: list[dict] = []

    @property
    def done(self) -> bool:
        return self.seek >= self.frames

    def window(self) -> Window | None:
        """The next window to decode, skipping silent ones; None when the input is finished."""
        while not self.done and self._silent():
            self.seek += min(N_FRAMES, self.frames - self.seek)
        if self.done:
            return None
        timestamps = self.options.timestamps if self.options.timestamps is not None else self.frames > N_FRAMES
        options = DecodingOptions(task=self.options.task, timestamps=timestamps)
        mel = self.mel[:, self.seek: self.seek + N_FRAMES]  # padding appended at load keeps this 3000 frames
        return Window(self, mel, options, self.language)

    def advance(self, r: DecodingResult) -> list[dict]:
        """Consume the decoding of the current window; returns the segments it closed."""
        self.language = self.language or r.language  # detected on the first window, kept for the rest
        before = len(self.segments)
        _advance(self, r, self.options, self.tokenizer)
        return self.segments[before:]

    def result(self) -> dict:
        """{"text", "language", "segments", "duration"} of the finished input."""
        duration = round(len(self.audio) / SAMPLE_RATE, 3)
        segments = [seg for seg in self.segments if seg["text"]]
        for seg in segments:  # the model may stamp an end inside the zero padding after the audio
            seg["end"] = min(seg["end"], duration)
            seg["start"] = min(seg["start"], seg["end"])
        return {"text": " ".join(seg["text"] for seg in segments).strip(), "language": self.language or "en",
                "segments": segments, "duration": duration}

    def _silent(self) -> bool:
        return is_silent(self.audio[self.seek * HOP_LENGTH: (self.seek + N_FRAMES) * HOP_LENGTH])


def _feature_device(model) -> torch.device | str:
    if isinstance(model, torch.nn.Module):
        return next(model.parameters()).device
    return getattr(model, "device", "cpu")  # a CudaRuntime names its device; the MLX twin takes CPU features


def decode_windows(model, windows: list[Window]) -> list[DecodingResult]:
    """Decode windows that share their DecodingOptions in one batch: stack their mels and run the model's
    (or runtime's) decoder. `model`: a liteasr Whisper, a liteasr.cuda.CudaRuntime or the MLX twin."""
    options = windows[0].options
    if any(w.options != options for w in windows):
        raise ValueError("decode_windows: windows of one batch must share their DecodingOptions")
    mel = torch.stack([w.mel for w in windows])  # (B, n_mels, 3000)
    decode_batch = getattr(model, "decode", None) or partial(decode, model)  # runtimes and MLX: their own
    return decode_batch(mel, options, [w.language for w in windows])


def transcribe(model, audio: str | os.PathLike | np.ndarray | list, **options) -> dict | list[dict]:
    """Transcribe one input or a list of inputs (paths or 16-kHz float arrays).

    `model`: a liteasr Whisper (the eager reference on its device), a liteasr.cuda.CudaRuntime (the fast
    CUDA path) or the MLX twin. Returns, per input, {"text", "language", "segments": [{"start", "end",
    "text", "tokens", "avg_logprob", "no_speech_prob"}], "duration"}; a single input gives a single dict.
    The first input that cannot be read or decoded raises; `transcribe_iter` carries on past bad inputs."""
    single = not isinstance(audio, (list, tuple))
    items = [audio] if single else list(audio)
    results: list[dict] = [{}] * len(items)
    for i, out in transcribe_iter(model, items, TranscribeOptions(**options)):
        if isinstance(out, Exception):
            raise out
        results[i] = out
    return results[0] if single else results


def transcribe_iter(model, items: list, options: "TranscribeOptions" = None,
                    names: list[str] | None = None) -> Iterator[tuple[int, dict | Exception]]:
    """Transcribe many inputs, yielding (index, result) as soon as each input is finished, and (index,
    exception) for an input that could not be read or decoded: one bad input never stops the others.

    At most `options.max_active` inputs are loaded at a time (a corpus of any size runs in bounded memory);
    their windows are batched together, longest remaining audio first."""
    from tqdm import tqdm

    opts = options or TranscribeOptions()
    if opts.chunk_s is not None:
        yield from _transcribe_chunked(model, items, opts, names)
        return
    pending = iter(enumerate(items))
    active: list[tuple[int, Job]] = []
    with tqdm(total=len(items), unit="file", disable=not opts.progress, desc="transcribe") as bar:
        while True:
            while len(active) < opts.max_active and (nxt := next(pending, None)) is not None:
                i, item = nxt
                try:
                    active.append((i, Job(model, item, opts, names[i] if names else None)))
                except Exception as e:  # unreadable input: report it, keep going
                    bar.update()
                    yield i, _named(e, names[i] if names else item)
            if not active:
                return
            failed = _step(model, [job for _, job in active], opts)
            for i, job in list(active):
                if job in failed or job.done:
                    active.remove((i, job))
                    bar.update()
                    yield i, _named(failed[job], job.name) if job in failed else job.result()


def _transcribe_chunked(model, items: list, opts: TranscribeOptions,
                        names: list[str] | None) -> Iterator[tuple[int, dict | Exception]]:
    """transcribe_iter with opts.chunk_s: up to max_active inputs at a time are loaded and split, and their
    pieces transcribed together as independent inputs, then stitched per input."""
    from dataclasses import replace

    from tqdm import tqdm

    whole = replace(opts, chunk_s=None, progress=False)
    with tqdm(total=len(items), unit="file", disable=not opts.progress, desc="transcribe") as bar:
        for start in range(0, len(items), opts.max_active):
            pieces: list[np.ndarray] = []
            owner: list[tuple[int, int]] = []  # (input index, first sample) of each piece
            total: dict[int, int] = {}
            for i in range(start, min(start + opts.max_active, len(items))):
                name = names[i] if names else items[i]
                try:
                    audio = read_audio(items[i])
                    total[i] = len(audio)
                    for a, b in split_points(audio, opts.chunk_s):
                        pieces.append(audio[a:b])
                        owner.append((i, a))
                except Exception as e:
                    bar.update()
                    yield i, _named(e, name)
            parts: dict[int, list[tuple[int, dict]]] = {i: [] for i in total}
            failed: dict[int, Exception] = {}
            for k, out in transcribe_iter(model, pieces, whole):
                i, first = owner[k]
                if isinstance(out, Exception):
                    failed.setdefault(i, _named(out, names[i] if names else items[i]))
                else:
                    parts[i].append((first, out))
            for i in total:
                bar.update()
                yield i, failed[i] if i in failed else stitch(parts[i], total[i])


def read_audio(item) -> np.ndarray:
    """16-kHz float32 samples of a path (decoded, resampled) or an array (checked)."""
    return load_audio(item) if isinstance(item, (str, os.PathLike)) else check_audio(np.asarray(item))


def split_points(audio: np.ndarray, chunk_s: float) -> list[tuple[int, int]]:
    """[(first, end) sample] of consecutive pieces of at most `chunk_s` seconds covering `audio` (T,).

    Each cut falls at the quietest half second (mean energy of 25-ms frames) in the second half of the piece
    it ends, so that words are rarely cut and no piece is shorter than chunk_s / 2 unless it is the last.
    A function of the samples alone: every process given the same audio cuts it at the same points."""
    n, limit = len(audio), int(chunk_s * SAMPLE_RATE)
    if n <= limit:
        return [(0, n)]
    frame, smooth = 400, 20  # 25-ms frames, averaged over 20 of them (0.5 s)
    energy = np.square(audio[: n // frame * frame].astype(np.float64)).reshape(-1, frame).mean(axis=1)
    csum = np.concatenate([[0.0], np.cumsum(energy)])
    bounds, first = [], 0
    while n - first > limit:
        lo, hi = (first + limit // 2) // frame, (first + limit) // frame - smooth  # candidate frames
        level = (csum[lo + smooth: hi + smooth] - csum[lo: hi]) / smooth  # mean energy of [f, f + smooth)
        cut = (lo + int(np.argmin(level)) + smooth // 2) * frame  # the middle of the quietest half second
        bounds.append((first, cut))
        first = cut
    return bounds + [(first, n)]


def stitch(parts: list[tuple[int, dict]], num_samples: int) -> dict:
    """One input's result from its pieces' results: `parts` is [(first sample, result)] in any order; segment
    times move by the piece's offset, texts join in order. The language is the first piece's."""
    parts = sorted(parts, key=lambda p: p[0])
    segments = []
    for first, r in parts:
        offset = first / SAMPLE_RATE
        segments += [{**seg, "start": round(seg["start"] + offset, 3), "end": round(seg["end"] + offset, 3)}
                     for seg in r["segments"]]
    text = " ".join(t for _, r in parts if (t := r["text"]))
    return {"text": text, "language": parts[0][1]["language"], "segments": segments,
            "duration": round(num_samples / SAMPLE_RATE, 3)}


def _named(e: Exception, item) -> Exception:
    """e, with the input's name in its message when it does not say it already."""
    name = str(item) if isinstance(item, (str, os.PathLike)) else None
    if name is None or name in str(e):
        return e
    return type(e)(f"{name}: {e}") if type(e) in (ValueError, RuntimeError, OSError) else e


def _step(model, jobs: list[Job], opts: "TranscribeOptions") -> dict[Job, Exception]:
    """Decode one window of every job, in batches of equal options, longest remaining audio first (windows of
    similar length decode for a similar number of steps, so a batch wastes fewer steps on finished rows).
    Returns the jobs whose window failed to decode, with the error; a failing batch is retried window by
    window so that only the bad input fails."""
    windows = [w for job in sorted(jobs, key=lambda j: j.frames - j.seek, reverse=True) if (w := job.window())]
    groups: dict[DecodingOptions, list[Window]] = {}
    for w in windows:
        groups.setdefault(w.options, []).append(w)
    failed: dict[Job, Exception] = {}
    for group in groups.values():
        for i in range(0, len(group), opts.batch_size):
            batch = group[i: i + opts.batch_size]
            try:
                outs = list(zip(batch, decode_windows(model, batch)))
            except Exception as e:
                if len(batch) == 1:
                    failed[batch[0].job] = e
                    continue
                outs = []
                for w in batch:
                    try:
                        outs.append((w, decode_windows(model, [w])[0]))
                    except Exception as e1:
                        failed[w.job] = e1
            for w, r in outs:
                w.job.advance(r)
    return failed


def is_silent(samples: np.ndarray) -> bool:
    """Whether a window's samples never reach the model (digital silence, or quiet and steady noise)."""
    chunk = samples.astype(np.float64)
    if chunk.size == 0:
        return True
    # RMS, not peak: faint broadband noise has peaks 10-15 dB above its RMS level
    rms = float(np.sqrt(np.mean(np.square(chunk))))
    if rms < SILENCE_RMS or rms >= QUIET_RMS:
        return rms < SILENCE_RMS
    frames = chunk[: chunk.size // 400 * 400].reshape(-1, 400)  # 25-ms frames
    if len(frames) < 2:
        return False
    energy_db = 10 * np.log10(np.mean(np.square(frames), axis=1) + 1e-20)
    return float(np.percentile(energy_db, 95) - np.percentile(energy_db, 10)) < STEADY_DB


def _advance(s: Job, r: DecodingResult, opts: TranscribeOptions, tok: Tokenizer) -> None:
    """Turn one decoded window into segments and move `s.seek` past what it covered."""
    ts0 = tok.timestamp_begin
    size = min(N_FRAMES, s.frames - s.seek)  # frames of real audio in this window
    offset = s.seek * HOP_LENGTH / SAMPLE_RATE
    if r.no_speech_prob > opts.no_speech_threshold and (
            r.avg_logprob < opts.logprob_threshold or compression_ratio(r.text) > opts.compression_ratio_threshold):
        # Whisper's no-speech rule (confident silence and an unconvincing transcript), plus: a
        # window the model itself rates as no speech whose text is a repetition loop ("5,5,5,…"
        # on noise) is skipped too. openai/whisper would re-decode such text at a higher
        # temperature; greedy-only decoding has no fallback, so the no-speech verdict wins.
        s.seek += size
        return
    tokens = r.tokens
    is_ts = [t >= ts0 for t in tokens]
    # Boundaries between two consecutive timestamps close one segment and open the next.
    cuts = [i for i in range(1, len(tokens)) if is_ts[i] and is_ts[i - 1]]
    single_ending = is_ts[-2:] == [False, True]
    if cuts:
        slices = cuts + ([len(tokens)] if single_ending else [])
        start = 0
        for end in slices:
            part = tokens[start:end]
            s.segments.append(_segment(part, offset + (part[0] - ts0) * TIME_PRECISION,
                                       offset + (part[-1] - ts0) * TIME_PRECISION, r, tok))
            start = end
        # Resume from the last closed timestamp, unless the window ended with a lone timestamp.
        # (mel frames = 2 per timestamp step; at least one frame, so a window of zero-length segments still moves on)
        s.seek += size if single_ending else max((tokens[start - 1] - ts0) * 2, 1)
        return
    stamps = [t for t in tokens if t >= ts0]
    duration = size * HOP_LENGTH / SAMPLE_RATE
    if stamps and stamps[-1] != ts0:
        duration = (stamps[-1] - ts0) * TIME_PRECISION
    if any(not t for t in is_ts):
        s.segments.append(_segment(tokens, offset, offset + duration, r, tok))
    s.seek += size


def compression_ratio(text: str) -> float:
    """len(text) / len(gzip(text)) in UTF-8 bytes: about 1-2 for speech, high for repetition loops."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def _segment(tokens: list[int], start: float, end: float, r: DecodingResult, tok: Tokenizer) -> dict:
    text_tokens = [t for t in tokens if t < tok.timestamp_begin]
    return {"start": round(start, 3), "end": round(end, 3), "text": tok.decode(text_tokens).strip(),
            "tokens": text_tokens,
            "avg_logprob": r.avg_logprob, "no_speech_prob": r.no_speech_prob}


# ---------------------------------------------------------------------------------------------------
# output writers


def format_timestamp(seconds: float, separator: str = ",") -> str:
    """00:01:02,345 (srt) or 00:01:02.345 (vtt)."""
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def render(result: dict, fmt: str) -> str:
    """The text of one transcription result in `fmt` (txt, json, srt or vtt)."""
    segs = result["segments"]
    if fmt == "txt":
        return result["text"] + "\n"
    if fmt == "json":
        return json.dumps(result, ensure_ascii=False, indent=2) + "\n"
    if fmt == "srt":
        return "".join(f"{i}\n{format_timestamp(g['start'])} --> {format_timestamp(g['end'])}\n{g['text']}\n\n"
                       for i, g in enumerate(segs, 1))
    if fmt == "vtt":
        return "WEBVTT\n\n" + "".join(
            f"{format_timestamp(g['start'], '.')} --> {format_timestamp(g['end'], '.')}\n{g['text']}\n\n" for g in segs)
    raise ValueError(f"unknown output format {fmt!r} (choose from {', '.join(OUTPUT_FORMATS)})")


def write_result(result: dict, path: str | os.PathLike) -> Path:
    """Write `result` to `path` in the format its suffix names, atomically (temporary file, then rename)."""
    path = Path(path)
    text = render(result, path.suffix.lstrip("."))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["transcribe", "transcribe_iter", "TranscribeOptions", "Job", "Window", "decode_windows", "render",
           "read_audio", "split_points", "stitch",
           "write_result", "format_timestamp"]
