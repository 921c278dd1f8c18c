"""What word timestamps cost per 30-s window on CPU, next to decoding the same window.

    .venv/bin/python benchmarks/alignment_cpu.py --models tiny.en base --batch 1 4 --repeats 3 \
        --output docs/results/alignment-cpu.json

Windows: speech-dev clips (at most 30 s, sorted by id) concatenated and cut into full 30-s
windows of real speech, so every window carries a full window's text (about 80-100 words). Each
batch is first decoded once with timestamps (greedy, `liteasr.decoding.decode`), untimed, to get the
tokens and segments. Then, per round, interleaved:

- decode: `decode` of the batch (encoder + greedy decoding with timestamps), the
  transcription cost that alignment is added to;
- align: `word_timestamps(model, features, windows)` given the encoder output (what transcribe
  has at hand): the cross keys/values are projected again;
- align+cache: the same with the decode's KVCache passed in (its cross keys/values reused);
- align(mel): `word_timestamps(model, mel, windows)`: the encoder runs again (what a caller that
  kept neither the features nor the cache pays).

The median over --repeats rounds is reported per window, with align / decode. Threads: --threads
(default 1, as the test suite on the shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import liteasr
from liteasr.alignment import WindowText, word_timestamps
from liteasr.audio import N_SAMPLES, SAMPLE_RATE, load_audio, log_mel_spectrogram
from liteasr.decoding import DecodingOptions, decode
from liteasr.eval import read_manifest
from liteasr.tokenizer import TIME_PRECISION

SPEECH_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speech-dev" / "manifest.jsonl"


def speech_windows(n: int) -> list[np.ndarray]:
    """n windows of 30 s of speech: clips concatenated in id order, cut every 30 s."""
    clips = sorted((c for c in read_manifest(SPEECH_DEV) if c.duration <= 30.0), key=lambda c: c.id)
    audio, out = [], []
    for clip in clips:
        audio.append(load_audio(clip.audio))
        if sum(map(len, audio)) >= N_SAMPLES:
            joined = np.concatenate(audio)
            out.append(joined[:N_SAMPLES])
            audio = [joined[N_SAMPLES:]]
            if len(out) == n:
                return out
    raise SystemExit(f"speech-dev holds fewer than {n} windows of 30 s")


def window_text(tokens: list[int], tok) -> WindowText:
    """Segments from the (start, text…, end) timestamp pairs of one decoded window."""
    ts0 = tok.timestamp_begin
    segments, spans, current, start = [], [], [], 0.0
    for t in tokens:
        if t >= ts0:
            if current:
                segments.append(current)
                spans.append((start, (t - ts0) * TIME_PRECISION))
                current = []
            start = (t - ts0) * TIME_PRECISION
        else:
            current.append(t)
    if current:
        segments.append(current)
        spans.append((start, 30.0))
    return WindowText(segments, spans, 0.0, 3000, "en")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(model, mel: torch.Tensor, repeats: int) -> dict:
    opts = DecodingOptions(timestamps=True, language="en")
    results = decode(model, mel, opts, ["en"] * mel.shape[0])
    windows = [window_text(r.tokens, model.tokenizer) for r in results]
    with torch.inference_mode():
        features = model.encoder(mel)
        cache = model.decoder.new_cache(features)
    words = sum(len(w.words) for segs in word_timestamps(model, features, windows) for w in segs)  # warm-up
    times: dict[str, list[float]] = {"decode": [], "align": [], "align+cache": [], "align(mel)": []}
    for _ in range(repeats):
        times["decode"].append(timed(lambda: decode(model, mel, opts, ["en"] * mel.shape[0])))
        times["align"].append(timed(lambda: word_timestamps(model, features, windows)))
        times["align+cache"].append(timed(lambda: word_timestamps(model, features, windows, cache=cache)))
        times["align(mel)"].append(timed(lambda: word_timestamps(model, mel, windows)))
    b = mel.shape[0]
    per_window = {k: statistics.median(v) / b for k, v in times.items()}
    return {"batch": b, "words_per_window": words / b,
            "tokens_per_window": sum(len(r.tokens) for r in results) / b,
            **{f"{k}_s_per_window": round(v, 4) for k, v in per_window.items()},
            "align_over_decode": round(per_window["align"] / per_window["decode"], 3),
            "align_cache_over_decode": round(per_window["align+cache"] / per_window["decode"], 3),
            "align_mel_over_decode": round(per_window["align(mel)"] / per_window["decode"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    audio = speech_windows(max(args.batch))
    mel = torch.stack([log_mel_spectrogram(a, 80, padding=0)[:, :3000] for a in audio])  # (B, 80, 3000)
    rows = []
    for name in args.models:
        model = liteasr.load_model(name, "cpu", torch.float32)
        for b in args.batch:
            row = {"model": name, **bench(model, mel[:b], args.repeats)}
            print(json.dumps(row))
            rows.append(row)
    meta = {"threads": args.threads, "repeats": args.repeats, "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "window_s": N_SAMPLES / SAMPLE_RATE}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
