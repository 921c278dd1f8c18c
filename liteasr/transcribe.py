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
from dataclasses import dataclass, field
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


@dataclass
class _State:
    """Decoding progress of one input."""

    mel: torch.Tensor  # (n_mels, frames + N_FRAMES): log-mel with 30 s of padding appended
    audio: np.ndarray
    frames: int  # mel frames of real audio
    language: str | None
    seek: int = 0
    segments: list[dict] = field(default_factory=list)


def transcribe(model: Whisper, audio: str | os.PathLike | np.ndarray | list, **options) -> dict | list[dict]:
    """Transcribe one input or a list of inputs (paths or 16-kHz float arrays).

    Returns, per input, {"text", "language", "segments": [{"start", "end", "text", "tokens",
    "avg_logprob", "no_speech_prob"}], "duration"}; a single input gives a single dict.
    """
    opts = TranscribeOptions(**options)
    single = not isinstance(audio, (list, tuple))
    items = [audio] if single else list(audio)
    states = [_prepare(model, item, opts) for item in items]
    _run(model, states, opts)
    results = [_finish(s) for s in states]
    return results[0] if single else results


def _prepare(model: Whisper, item, opts: TranscribeOptions) -> _State:
    samples = load_audio(item) if isinstance(item, (str, os.PathLike)) else check_audio(np.asarray(item))
    # Features are computed by torch; a non-torch model (the MLX twin) takes them from the CPU.
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else "cpu"
    mel = log_mel_spectrogram(samples, model.dims.num_mel_bins, padding=N_SAMPLES, device=device)
    frames = mel.shape[-1] - N_FRAMES
    return _State(mel, samples, frames, opts.language if model.is_multilingual else "en")


def _run(model: Whisper, states: list[_State], opts: TranscribeOptions) -> None:
    from tqdm import tqdm

    total = sum(s.frames for s in states)
    with tqdm(total=total, unit="frames", disable=not opts.progress, desc="transcribe") as bar:
        while active := [s for s in states if s.seek < s.frames]:
            # Longest remaining audio first: windows of similar length decode for a similar number
            # of steps, so a batch wastes fewer steps on rows that already reached <|endoftext|>.
            active.sort(key=lambda s: s.frames - s.seek, reverse=True)
            for i in range(0, len(active), opts.batch_size):
                batch = active[i: i + opts.batch_size]
                before = sum(s.seek for s in batch)
                _step(model, batch, opts)
                bar.update(sum(s.seek for s in batch) - before)


def _step(model: Whisper, batch: list[_State], opts: TranscribeOptions) -> None:
    """Decode the current window of every input in `batch` and advance their seek positions."""
    silent = [_is_silent(s) for s in batch]
    todo = [s for s, quiet in zip(batch, silent) if not quiet]
    for s in (s for s, quiet in zip(batch, silent) if quiet):
        s.seek += min(N_FRAMES, s.frames - s.seek)
    if not todo:
        return
    # Windows that need timestamps and windows that don't take different prompts: decode apart.
    groups: dict[bool, list[_State]] = {}
    for s in todo:
        groups.setdefault(_wants_timestamps(s, opts), []).append(s)
    for ts, group in groups.items():
        mel = torch.stack([_window(s) for s in group])  # (B, n_mels, 3000)
        options = DecodingOptions(task=opts.task, timestamps=ts)
        decode_batch = getattr(model, "decode", None) or partial(decode, model)  # MLX twin: its own decode
        results = decode_batch(mel, options, [s.language for s in group])
        for s, r in zip(group, results):
            s.language = s.language or r.language  # detected on the first window, kept for the rest
            _advance(s, r, opts, model.tokenizer)


def _wants_timestamps(s: _State, opts: TranscribeOptions) -> bool:
    return opts.timestamps if opts.timestamps is not None else s.frames > N_FRAMES


def _window(s: _State) -> torch.Tensor:
    return s.mel[:, s.seek: s.seek + N_FRAMES]  # padding appended by _prepare keeps this 3000 frames


def _is_silent(s: _State) -> bool:
    a, b = s.seek * HOP_LENGTH, (s.seek + N_FRAMES) * HOP_LENGTH
    chunk = s.audio[a:b].astype(np.float64)
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


def _advance(s: _State, r: DecodingResult, opts: TranscribeOptions, tok: Tokenizer) -> None:
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


def _finish(s: _State) -> dict:
    duration = round(len(s.audio) / SAMPLE_RATE, 3)
    segments = [seg for seg in s.segments if seg["text"]]
    for seg in segments:  # the model may stamp an end inside the zero padding after the audio
        seg["end"] = min(seg["end"], duration)
        seg["start"] = min(seg["start"], seg["end"])
    return {"text": " ".join(seg["text"] for seg in segments).strip(), "language": s.language or "en",
            "segments": segments, "duration": duration}


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


__all__ = ["transcribe", "TranscribeOptions", "render", "write_result", "format_timestamp"]
