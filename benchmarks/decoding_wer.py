"""WER and CPU speed of liteasr's decoding modes on held-out speech-dev clips, dense and compressed, one run.

    .venv/bin/python benchmarks/decoding_wer.py --models tiny.en /tmp/tiny-c --clips 60 --openai-whisper \
        --output docs/results/decoding-wer-tiny.en.json

Clips: the speech-dev clips *not* chosen for calibration by `liteasr.compress.calibrate.select_calibration(manifest,
--num-calibration)` (the clips `liteasr compress --num-clips 64` calibrated on), sorted by id, --clips of them
evenly spaced (every domain appears). Audio is decoded once, before any timing; the forced language is "en".

Modes (liteasr.transcribe options, openai-whisper's names):
- greedy: temperature 0 only (no fallback), liteasr's previous behaviour;
- greedy+fallback: the library default (openai-whisper's transcribe() default);
- beam5+fallback: beam_size 5, best_of 5 (openai-whisper's CLI default, liteasr's CLI default).
Per mode: corpus WER after Whisper's English normaliser (liteasr.eval.score), windows that fell back (a segment
decoded at temperature > 0), outputs whose gzip ratio stays above 2.4, and RTFx = audio seconds / wall seconds of
the whole transcribe call (log-mel, batching of --batch-size, decoding). --openai-whisper also times
openai-whisper's own transcribe on the same arrays with the same settings (one clip at a time: it has no
batching), with our weights loaded through its checkpoint format (dense product of factored layers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import liteasr
from liteasr.audio import SAMPLE_RATE, load_audio
from liteasr.compress.calibrate import select_calibration
from liteasr.decoding import compression_ratio
from liteasr.eval import read_manifest, score

SPEECH_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speech-dev" / "manifest.jsonl"
SCHEDULE = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
MODES = {
    "greedy": dict(temperature=0.0),
    "greedy+fallback": dict(temperature=SCHEDULE),
    "beam5+fallback": dict(temperature=SCHEDULE, beam_size=5, best_of=5),
}


def held_out(manifest: Path, n: int, num_calibration: int):
    _, calib = select_calibration(manifest, num_calibration)
    clips = sorted((c for c in read_manifest(manifest) if c.id not in set(calib)), key=lambda c: c.id)
    return clips if n >= len(clips) else [clips[i * len(clips) // n] for i in range(n)]


def fell_back(results: list[dict]) -> int:
    return sum(len({s["seek"] for s in r["segments"] if s["temperature"] > 0}) for r in results)


def run_liteasr(model, arrays, clips, mode: str, batch_size: int) -> dict:
    t = time.perf_counter()
    results = liteasr.transcribe(model, arrays, language="en", batch_size=batch_size, **MODES[mode])
    wall = time.perf_counter() - t
    return summary(clips, [r["text"] for r in results], wall, fell_back(results))


def run_openai_whisper(model, name: str, arrays, clips, mode: str) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tempfile

    from openai_whisper_ref import openai_whisper_model

    ref = openai_whisper_model(model, None, Path(tempfile.mkdtemp()))
    opts = dict(MODES[mode])
    t = time.perf_counter()
    results = [ref.transcribe(a, language="en", fp16=False, verbose=None, **opts) for a in arrays]
    wall = time.perf_counter() - t
    return summary(clips, [r["text"].strip() for r in results], wall, fell_back(results))


def summary(clips, texts: list[str], wall: float, n_fallback: int) -> dict:
    audio_s = sum(c.duration for c in clips)
    s = score(clips, texts)
    return {"wer": round(100 * s["overall"]["error_rate"], 2), "windows_fell_back": n_fallback,
            "loops_left": sum(compression_ratio(t) > 2.4 for t in texts), "wall_s": round(wall, 2),
            "rtfx": round(audio_s / wall, 2), "texts": texts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny.en"], help="names or directories (e.g. `liteasr compress` output)")
    ap.add_argument("--manifest", type=Path, default=SPEECH_DEV)
    ap.add_argument("--clips", type=int, default=60)
    ap.add_argument("--num-calibration", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--openai-whisper", action="store_true", help="also time openai-whisper's transcribe")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clips = held_out(args.manifest, args.clips, args.num_calibration)
    arrays = [load_audio(str(c.audio)) for c in clips]
    audio_s = sum(len(a) for a in arrays) / SAMPLE_RATE
    print(f"{len(clips)} held-out clips, {audio_s:.0f} s of audio, {args.threads} thread(s)", flush=True)
    report = {"clips": [c.id for c in clips], "audio_s": round(audio_s, 1), "threads": args.threads,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "runs": []}
    for name in args.models:
        model = liteasr.load_model(name, "cpu", torch.float32)
        liteasr.transcribe(model, arrays[:2], language="en", temperature=0.0)  # warm-up
        for mode in args.modes:
            engines = [("liteasr", lambda: run_liteasr(model, arrays, clips, mode, args.batch_size))]
            if args.openai_whisper:
                engines.append(("openai-whisper", lambda: run_openai_whisper(model, name, arrays, clips, mode)))
            for engine, run in engines:
                row = {"model": name, "mode": mode, "engine": engine, **run()}
                report["runs"].append(row)
                print(f"{name:>24} {mode:>16} {engine:>15}: WER {row['wer']:6.2f} %  fell back {row['windows_fell_back']:3d}"
                      f"  loops left {row['loops_left']}  RTFx {row['rtfx']:6.2f}", flush=True)
                if args.output:  # after every run: a long benchmark keeps what it measured
                    args.output.parent.mkdir(parents=True, exist_ok=True)
                    args.output.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
