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
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import atomic
from .audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, check_audio, load_audio, log_mel_spectrogram
from .decoding import DecodingOptions, DecodingResult, decode
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
    # decoding, as openai-whisper's transcribe(): each window at the first temperature (beam search if
    # beam_size, else greedy), re-decoded at the next one while its text is a loop or unlikely
    temperature: float | tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    best_of: int | None = None  # samples per window at temperature > 0
    beam_size: int | None = None  # beams at temperature 0 (None: greedy)
    patience: float | None = None
    length_penalty: float | None = None
    compression_ratio_threshold: float | None = 2.4  # fallback above this gzip ratio (a repetition loop) …
    logprob_threshold: float | None = -1.0  # … or below this average log-probability;
    no_speech_threshold: float | None = 0.6  # skip a window when P(no speech) is above this and the log-prob below
    condition_on_previous_text: bool = True  # prompt each window with the text before it (reset after T > 0.5)
    initial_prompt: str | None = None  # text prompting the first window (names, spelling, style)
    carry_initial_prompt: bool = False  # prompt every window with initial_prompt (hotwords), before earlier text
    prefix: str | None = None  # text forced at the start of every window (not part of the output)
    seed: int = 0  # of the sampling at temperature > 0: the same inputs and options give the same output
    word_timestamps: bool = False  # time every word (liteasr.alignment; implies timestamps) and seek to the last one
    prepend_punctuations: str = "\"'“¿([{-"  # with word_timestamps: merged into the following word …
    append_punctuations: str = "\"'.。,，!！?？:：”)]}、"  # … and into the preceding one
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

    def decoding(self, timestamps: bool) -> DecodingOptions:
        """The DecodingOptions of one window."""
        return DecodingOptions(task=self.task, timestamps=timestamps, temperature=self.temperature,
                               best_of=self.best_of, beam_size=self.beam_size, patience=self.patience,
                               length_penalty=self.length_penalty,
                               compression_ratio_threshold=self.compression_ratio_threshold,
                               logprob_threshold=self.logprob_threshold, no_speech_threshold=self.no_speech_threshold,
                               prefix=self.prefix, seed=self.seed)


def temperature_schedule(temperature: float, increment: float | None) -> tuple[float, ...]:
    """openai-whisper CLI's schedule: temperature, temperature + increment, … up to 1.0; just `temperature` when
    the increment is None."""
    if increment is None or increment <= 0:
        return (temperature,)
    return tuple(round(float(t), 6) for t in np.arange(temperature, 1.0 + 1e-6, increment))


@dataclass(frozen=True)
class Window:
    """One 30-s window of one Job, ready to decode. Windows with equal `options` can share a batch."""

    job: "Job"
    mel: torch.Tensor  # (n_mels, 3000)
    options: DecodingOptions
    language: str | None  # known (forced, or detected on an earlier window) or None: detect
    prompt: tuple[int, ...] = ()  # tokens of earlier text this window is conditioned on (openai-whisper's prompt)


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
        self.model = model  # word alignment runs the decoder again
        self.last_speech = 0.0  # end of the last timed word (openai-whisper's last_speech_timestamp)
        self.audio = read_audio(item)
        # Features are computed by torch; a non-torch model (the MLX twin) takes them from the CPU.
        self.mel = log_mel_spectrogram(self.audio, model.dims.num_mel_bins, padding=N_SAMPLES,
                                       device=_feature_device(model))  # (n_mels, frames + N_FRAMES)
        self.frames = self.mel.shape[-1] - N_FRAMES  # mel frames of real audio
        self.n_text_ctx = model.dims.max_target_positions  # decoder context: prompts keep its last half
        self.language = options.language if model.is_multilingual else "en"
        self.seek = 0
        self.segments: list[dict] = []
        # openai-whisper's prompt bookkeeping: the tokens of every kept segment, from which each window's prompt
        # is taken since the last reset (a window decoded above temperature 0.5 resets it)
        tok = self.tokenizer
        self.initial_prompt = tok.encode(" " + options.initial_prompt.strip()) if options.initial_prompt else []
        self.all_tokens: list[int] = list(self.initial_prompt)
        self.prompt_reset_since = 0

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
        timestamps = timestamps or self.options.word_timestamps
        mel = self.mel[:, self.seek: self.seek + N_FRAMES]  # padding appended at load keeps this 3000 frames
        return Window(self, mel, self.options.decoding(timestamps), self.language, tuple(self._prompt()))

    def _prompt(self) -> list[int]:
        if self.options.carry_initial_prompt:
            n_ctx = self.n_text_ctx
            rest = self.all_tokens[max(len(self.initial_prompt), self.prompt_reset_since):]
            return self.initial_prompt + rest[len(rest) - max(n_ctx // 2 - 1 - len(self.initial_prompt), 0):]
        return self.all_tokens[self.prompt_reset_since:]

    def advance(self, r: DecodingResult) -> list[dict]:
        """Consume the decoding of the current window; returns the segments it closed."""
        self.language = self.language or r.language  # detected on the first window, kept for the rest
        before, seek = len(self.segments), self.seek
        single_ending = _advance(self, r, self.options, self.tokenizer)
        if single_ending is not None:
            if self.options.word_timestamps:
                self._add_words(self.segments[before:], seek, single_ending, r.language)
            # as openai-whisper: instantaneous or empty segments are kept out of the prompt
            self.all_tokens += [t for seg in self.segments[before:] if seg["text"] and seg["start"] != seg["end"]
                                for t in seg["tokens"]]
            if not self.options.condition_on_previous_text or r.temperature > 0.5:
                self.prompt_reset_since = len(self.all_tokens)
        return self.segments[before:]

    def _add_words(self, segments: list[dict], seek: int, single_ending: bool, language: str) -> None:
        """openai-whisper's add_word_timestamps for this window's segments (refined start/end, "words"), then its
        seek to the end of the last word when the window did not end with a lone timestamp."""
        from .alignment import AlignmentOptions, WindowText, word_timestamps

        model = getattr(self.model, "model", self.model)  # a CudaRuntime aligns with its model's eager decoder
        if not isinstance(model, torch.nn.Module):
            raise ValueError("word_timestamps needs a PyTorch model or a CudaRuntime (not available on the MLX twin)")
        offset = seek * HOP_LENGTH / SAMPLE_RATE
        window = WindowText([s["tokens"] for s in segments], [(s["start"], s["end"]) for s in segments], offset,
                            min(N_FRAMES, self.frames - seek), language, self.last_speech)
        mel = self.mel[:, seek: seek + N_FRAMES][None].to(next(model.parameters()).dtype)  # (1, n_mels, 3000)
        opts = AlignmentOptions(task=self.options.task, prepend_punctuations=self.options.prepend_punctuations,
                                append_punctuations=self.options.append_punctuations)
        for seg, timed in zip(segments, word_timestamps(model, mel, [window], opts)[0]):
            seg["start"], seg["end"] = timed.start, timed.end
            seg["words"] = [{"word": w.word, "start": w.start, "end": w.end, "probability": w.probability}
                            for w in timed.words]
        ends = [w["end"] for seg in segments for w in seg["words"]]
        end = ends[-1] if ends else (segments[-1]["end"] if segments else None)
        if end is not None:
            if not single_ending and end > offset:
                self.seek = round(end * SAMPLE_RATE / HOP_LENGTH)
            self.last_speech = end

    def result(self) -> dict:
        """{"text", "language", "segments", "duration"} of the finished input."""
        duration = round(len(self.audio) / SAMPLE_RATE, 3)
        segments = [seg for seg in self.segments if seg["text"]]
        for i, seg in enumerate(segments):  # the model may stamp an end inside the zero padding after the audio
            seg["id"] = i
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
    (or runtime's) decoder, with the search and temperature fallback of the options and each window's own
    prompt (windows whose prompts differ in length are decoded in separate passes of the same call).
    `model`: a liteasr Whisper, a liteasr.cuda.CudaRuntime or the MLX twin."""
    options = windows[0].options
    if any(w.options != options for w in windows):
        raise ValueError("decode_windows: windows of one batch must share their DecodingOptions")
    mel = torch.stack([w.mel for w in windows])  # (B, n_mels, 3000)
    decode_batch = getattr(model, "decode", None) or partial(decode, model)  # runtimes and MLX: their own
    # the temperature fallback happens inside: only failing windows are decoded again, batched
    return decode_batch(mel, options, [w.language for w in windows], [list(w.prompt) for w in windows])


def transcribe(model, audio: str | os.PathLike | np.ndarray | list, **options) -> dict | list[dict]:
    """Transcribe one input or a list of inputs (paths or 16-kHz float arrays).

    `model`: a liteasr Whisper (the eager reference on its device), a liteasr.cuda.CudaRuntime (the fast
    CUDA path) or the MLX twin. `options`: the fields of TranscribeOptions (openai-whisper's names; the default
    is greedy decoding with temperature fallback, as openai-whisper's transcribe()). Returns, per input,
    {"text", "language", "segments": [{"id", "seek", "start", "end", "text", "tokens", "temperature",
    "avg_logprob", "compression_ratio", "no_speech_prob"}], "duration"}, openai-whisper's schema; a single
    input gives a single dict.
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


def _silence(r: DecodingResult, opts: TranscribeOptions) -> bool:
    """openai-whisper's no-speech rule: confident silence and an unconvincing transcript. Without a fallback
    (one temperature) also: a window the model rates as no speech whose text is a repetition loop ("5,5,5,…" on
    noise), which the fallback would otherwise have re-decoded."""
    if opts.no_speech_threshold is None or r.no_speech_prob <= opts.no_speech_threshold:
        return False
    unlikely = opts.logprob_threshold is None or r.avg_logprob <= opts.logprob_threshold
    looping = (opts.compression_ratio_threshold is not None and r.compression_ratio > opts.compression_ratio_threshold
               and len(opts.decoding(False).temperatures) == 1)
    return unlikely or looping


def _advance(s: Job, r: DecodingResult, opts: TranscribeOptions, tok: Tokenizer) -> bool | None:
    """Turn one decoded window into segments and move `s.seek` past what it covered. Returns None when it was
    skipped as silence, else whether it ended with a lone timestamp (nothing spoken after it)."""
    ts0 = tok.timestamp_begin
    size = min(N_FRAMES, s.frames - s.seek)  # frames of real audio in this window
    offset = s.seek * HOP_LENGTH / SAMPLE_RATE
    if _silence(r, opts):
        s.seek += size
        return None
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
            s.segments.append(_segment(s.seek, part, offset + (part[0] - ts0) * TIME_PRECISION,
                                       offset + (part[-1] - ts0) * TIME_PRECISION, r, tok))
            start = end
        # Resume from the last closed timestamp, unless the window ended with a lone timestamp.
        # (mel frames = 2 per timestamp step; at least one frame, so a window of zero-length segments still moves on)
        s.seek += size if single_ending else max((tokens[start - 1] - ts0) * 2, 1)
        return single_ending
    stamps = [t for t in tokens if t >= ts0]
    duration = size * HOP_LENGTH / SAMPLE_RATE
    if stamps and stamps[-1] != ts0:
        duration = (stamps[-1] - ts0) * TIME_PRECISION
    if any(not t for t in is_ts):
        s.segments.append(_segment(s.seek, tokens, offset, offset + duration, r, tok))
    s.seek += size
    return single_ending


def _segment(seek: int, tokens: list[int], start: float, end: float, r: DecodingResult, tok: Tokenizer) -> dict:
    """One segment in openai-whisper's schema (`id` is set when the input is finished); tokens include the
    timestamp tokens, as there."""
    return {"seek": seek, "start": round(start, 3), "end": round(end, 3), "text": tok.decode(tokens).strip(),
            "tokens": list(tokens), "temperature": r.temperature, "avg_logprob": r.avg_logprob,
            "compression_ratio": r.compression_ratio, "no_speech_prob": r.no_speech_prob}


# ---------------------------------------------------------------------------------------------------
# output writers


def format_timestamp(seconds: float, separator: str = ",") -> str:
    """00:01:02,345 (srt) or 00:01:02.345 (vtt)."""
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


@dataclass(frozen=True)
class SubtitleOptions:
    """How srt/vtt cues are cut when the segments carry words (openai-whisper's writer options)."""

    max_line_width: int | None = None  # characters per line; with max_line_count, cues ignore segment bounds
    max_line_count: int | None = None  # lines per cue
    highlight_words: bool = False  # one cue per word, the word underlined in its line
    max_words_per_line: int | None = None


def _cues(result: dict, opts: SubtitleOptions, sep: str) -> Iterator[tuple[str, str, str]]:
    """(start, end, text) of every srt/vtt cue: per segment, or from the words as openai-whisper's SubtitlesWriter
    cuts them (lines of at most max_line_width characters, max_line_count lines per cue, a new cue after a
    pause of 3 s; segment bounds kept unless both limits are given)."""
    segs = result["segments"]
    if not segs or "words" not in segs[0]:
        for g in segs:
            yield format_timestamp(g["start"], sep), format_timestamp(g["end"], sep), g["text"].strip().replace("-->", "->")
        return
    preserve = opts.max_line_count is None or opts.max_line_width is None
    width, per_line = opts.max_line_width or 1000, opts.max_words_per_line or 1000

    def subtitles() -> Iterator[list[dict]]:
        line_len, line_count, subtitle = 0, 1, []
        last = next((w["start"] for g in segs for w in g["words"]), segs[0]["start"])
        for g in segs:
            for chunk in range(0, len(g["words"]), per_line):
                for i, w in enumerate(g["words"][chunk: chunk + per_line]):
                    w = dict(w)
                    long_pause = not preserve and w["start"] - last > 3.0
                    has_room = line_len + len(w["word"]) <= width
                    seg_break = i == 0 and len(subtitle) > 0 and preserve
                    if line_len > 0 and has_room and not long_pause and not seg_break:
                        line_len += len(w["word"])  # the line goes on
                    else:
                        w["word"] = w["word"].strip()
                        if (subtitle and opts.max_line_count is not None
                                and (long_pause or line_count >= opts.max_line_count)) or seg_break:
                            yield subtitle  # a new cue
                            subtitle, line_count = [], 1
                        elif line_len > 0:  # a new line in this cue
                            line_count += 1
                            w["word"] = "\n" + w["word"]
                        line_len = len(w["word"].strip())
                    subtitle.append(w)
                    last = w["start"]
        if subtitle:
            yield subtitle

    for sub in subtitles():
        start, end = format_timestamp(sub[0]["start"], sep), format_timestamp(sub[-1]["end"], sep)
        text = "".join(w["word"] for w in sub)
        if not opts.highlight_words:
            yield start, end, text
            continue
        last = start
        for i, w in enumerate(sub):
            ws, we = format_timestamp(w["start"], sep), format_timestamp(w["end"], sep)
            if last != ws:
                yield last, ws, text
            yield ws, we, "".join(re.sub(r"^(\s*)(.*)$", r"\1<u>\2</u>", x["word"]) if j == i else x["word"]
                                  for j, x in enumerate(sub))
            last = we


def render(result: dict, fmt: str, subtitles: SubtitleOptions = SubtitleOptions()) -> str:
    """The text of one transcription result in `fmt` (txt, json, srt or vtt); srt/vtt cues are cut by words
    (`subtitles`) when the segments have them."""
    if fmt == "txt":
        return result["text"] + "\n"
    if fmt == "json":
        return json.dumps(result, ensure_ascii=False, indent=2) + "\n"
    if fmt == "srt":
        return "".join(f"{i}\n{a} --> {b}\n{t}\n\n" for i, (a, b, t) in enumerate(_cues(result, subtitles, ","), 1))
    if fmt == "vtt":
        return "WEBVTT\n\n" + "".join(f"{a} --> {b}\n{t}\n\n" for a, b, t in _cues(result, subtitles, "."))
    raise ValueError(f"unknown output format {fmt!r} (choose from {', '.join(OUTPUT_FORMATS)})")


def write_result(result: dict, path: str | os.PathLike, subtitles: SubtitleOptions = SubtitleOptions()) -> Path:
    """Write `result` to `path` in the format its suffix names, atomically (temporary file, then rename)."""
    path = Path(path)
    return atomic.write_text(path, render(result, path.suffix.lstrip("."), subtitles))


__all__ = ["transcribe", "transcribe_iter", "TranscribeOptions", "Job", "Window", "decode_windows", "temperature_schedule",
           "SubtitleOptions", "render",
           "read_audio", "split_points", "stitch",
           "write_result", "format_timestamp"]
