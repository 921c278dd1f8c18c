"""End-to-end CPU transcription speed and accuracy: liteasr next to transformers, same weights, one run.

    .venv/bin/python benchmarks/cpu_vs_transformers.py --model tiny.en --clips 40
    .venv/bin/python benchmarks/cpu_vs_transformers.py --model base --output out/bench-base.json

Both engines run the same fp32 weights (liteasr.save writes the model it loaded as a transformers
directory) on the same 16-kHz arrays, decoded from the clips before any timing, with the same torch
thread count, greedy decoding, the same forced prompt (language "en", task "transcribe" on
multilingual models; liteasr's per-input language detection is thereby skipped, as transformers'
is) and the same token limit (224 new tokens). Each engine transcribes one batch as a warm-up
first; then --repeats rounds time each engine on all clips, interleaved, the order flipping every
round, and the median per engine is reported. What is timed:

- liteasr: `model.transcribe(arrays, batch_size=B)` — log-mel, batching, decoding, detokenising;
- transformers: per batch of B, `WhisperFeatureExtractor` + `generate` + `batch_decode(skip_special_tokens=True)`.

Clips: speech-dev clips of at most 30 s sorted by id; --clips N takes N of them evenly spaced over
that list (so every domain is represented), the default is all of them. WER is the corpus WER after
Whisper normalisation (liteasr.eval.score). RTFx = audio seconds / wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import liteasr
from liteasr.audio import SAMPLE_RATE, load_audio
from liteasr.eval import read_manifest, score

SPEECH_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speech-dev" / "manifest.jsonl"
MAX_NEW_TOKENS = 224  # liteasr's default (half the decoder context)


def select_clips(manifest: Path, n: int | None):
    clips = sorted((c for c in read_manifest(manifest) if c.duration <= 30.0), key=lambda c: c.id)
    if n is None or n >= len(clips):
        return clips
    if n < 1:
        raise SystemExit("--clips must be >= 1")
    return [clips[i * len(clips) // n] for i in range(n)]  # evenly spaced over the id-sorted list


def batches(items: list, size: int):
    return [items[i: i + size] for i in range(0, len(items), size)]


def run_liteasr(model, arrays, batch_size: int, forced: dict) -> list[str]:
    return [r["text"] for r in model.transcribe(arrays, batch_size=batch_size, **forced)]


def run_transformers(hf, processor, arrays, batch_size: int, forced: dict) -> list[str]:
    texts: list[str] = []
    for batch in batches(arrays, batch_size):
        feats = processor.feature_extractor(batch, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        with torch.inference_mode():
            out = hf.generate(feats, max_new_tokens=MAX_NEW_TOKENS, **forced)
        texts += [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny.en", help="tiny.en, base, or any model directory liteasr loads")
    ap.add_argument("--manifest", default=str(SPEECH_DEV))
    ap.add_argument("--clips", type=int, default=None, help="number of clips (default: all clips of at most 30 s)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs per engine, interleaved with flipping order; the median is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both engines (default: torch's)")
    ap.add_argument("--output", default=None, help="JSON report path (default: out/cpu-vs-transformers-<model>.json)")
    args = ap.parse_args()

    import transformers
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generate's per-call deprecation notes would swamp the table
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    clips = select_clips(Path(args.manifest), args.clips)
    arrays = [load_audio(c.audio) for c in clips]  # decoded up front: not part of either timing
    audio_s = sum(len(a) for a in arrays) / SAMPLE_RATE

    model = liteasr.load_model(args.model, "cpu", torch.float32)
    forced = {"language": "en", "task": "transcribe"} if model.is_multilingual else {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = liteasr.save(model, Path(tmp) / "hf", dtype=torch.float32)
        hf = WhisperForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
        processor = WhisperProcessor.from_pretrained(hf_dir)

    engines = {"liteasr": lambda a: run_liteasr(model, a, args.batch_size, forced),
               "transformers": lambda a: run_transformers(hf, processor, a, args.batch_size, forced)}
    for run in engines.values():  # warm-up: one batch each
        run(arrays[: args.batch_size])

    load_before = os.getloadavg()
    walls: dict[str, list[float]] = {name: [] for name in engines}
    texts: dict[str, list[str]] = {}
    names = list(engines)
    for r in range(args.repeats):
        # Interleaved, and the order flips every round: a drift of the machine (clock, caches, another
        # process) then hits both engines alike instead of whichever happened to run second.
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            out = engines[name](arrays)
            walls[name].append(time.perf_counter() - t0)
            if texts.setdefault(name, out) != out:
                raise SystemExit(f"{name} gave different transcripts on repeat {r + 1}: decoding is not deterministic")
    load_after = os.getloadavg()
    results = {}
    for name in engines:
        wall = statistics.median(walls[name])
        results[name] = {"wall_s": wall, "walls_s": walls[name], "rtfx": audio_s / wall,
                         "wer": score(clips, texts[name])["overall"]["error_rate"],
                         "texts": dict(zip((c.id for c in clips), texts[name]))}

    lite, tf = results["liteasr"], results["transformers"]
    same = sum(lite["texts"][c.id] == tf["texts"][c.id] for c in clips)
    speedup = tf["wall_s"] / lite["wall_s"]
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
           f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
           f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"\n{args.model} fp32, batch size {args.batch_size}, greedy, {len(clips)} speech-dev clips, "
          f"median of {args.repeats} interleaved runs; {env}\n")
    print("| engine | clips | audio s | wall s (median) | runs s | RTFx | corpus WER % |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for name, r in results.items():
        runs = " / ".join(f"{w:.2f}" for w in r["walls_s"])
        print(f"| {name} | {len(clips)} | {audio_s:.1f} | {r['wall_s']:.2f} | {runs} | {r['rtfx']:.1f} | {100 * r['wer']:.2f} |")
    print(f"\nliteasr / transformers speed: {speedup:.2f}x (wall-time ratio transformers / liteasr); "
          f"identical transcripts: {same}/{len(clips)}")
    if load_before[0] > (os.cpu_count() or 1):
        print("warning: the machine was busy with other processes (load average above the CPU count); "
              "timings are noisy")

    report = {"model": args.model, "dtype": "float32", "batch_size": args.batch_size, "clips": len(clips),
              "clip_ids": [c.id for c in clips], "audio_s": audio_s, "threads": torch.get_num_threads(),
              "repeats": args.repeats, "forced": forced, "max_new_tokens": MAX_NEW_TOKENS, "environment": env,
              "load_average": {"before": load_before, "after": load_after},
              "speedup": speedup, "identical_transcripts": same, "engines": results}
    out = Path(args.output or f"out/cpu-vs-transformers-{Path(args.model).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
