"""One compressed model through transformers and through liteasr, side by side in one run (issue 4).

    .venv/bin/python benchmarks/hf_interop.py --model base --preset c --clips 40

Steps:
1. compress `--model` with LiteASR (`--preset`, calibration clips chosen from speech-dev by
   `liteasr.compress.select_calibration`), save it in the lite-whisper layout (float32) and export a
   remote-code copy (`liteasr.hf.export`);
2. transcribe `--clips` speech-dev clips that were *not* used for calibration (evenly spaced over the
   id-sorted rest, so every domain is in) through
   - liteasr's own `transcribe` (greedy),
   - transformers' `pipeline("automatic-speech-recognition")` with greedy decoding (num_beams=1),
   - the same pipeline with its default generation settings (transformers' ASR pipeline defaults to
     beam search, num_beams=5, when generation_config.json does not set it — ours does not, so that
     pipeline users get transformers' usual behaviour);
   all with language "en", task "transcribe", batch size 8, on the same decoded 16-kHz arrays;
3. load time of the saved model through `liteasr.load_model`, through `AutoModelForSpeechSeq2Seq`
   with liteasr's registered classes (no remote code), and through the exported remote-code
   directory in a process where liteasr cannot be imported: each in a fresh process, min of 3 loads.

Prints a table and writes JSON (default docs/results/hf-interop-<model>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SPEECH_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speech-dev" / "manifest.jsonl"

# Run in a fresh interpreter: import, then time `loads` loads of one directory through one path.
LOAD_SNIPPET = """
import sys, time
path, how, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if how == "remote-code":
    sys.modules["liteasr"] = None  # prove the exported directory needs only torch + transformers
    from transformers import AutoModelForSpeechSeq2Seq
    load = lambda: AutoModelForSpeechSeq2Seq.from_pretrained(path, trust_remote_code=True)
elif how == "transformers":
    import liteasr  # registers the lite-whisper classes with the Auto classes
    from transformers import AutoModelForSpeechSeq2Seq
    load = lambda: AutoModelForSpeechSeq2Seq.from_pretrained(path)
else:
    import liteasr
    load = lambda: liteasr.load_model(path)
times = []
for _ in range(n):
    t = time.perf_counter(); m = load(); times.append(time.perf_counter() - t); del m
print(min(times))
"""


def load_seconds(path: Path, how: str, n: int = 3) -> float:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, str(path), how, str(n)], capture_output=True,
                         text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base")
    ap.add_argument("--preset", default="c", help="LiteASR threshold or preset (a, b, c)")
    ap.add_argument("--calibration-clips", type=int, default=32)
    ap.add_argument("--clips", type=int, default=40, help="held-out clips to transcribe")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    import liteasr
    from liteasr.audio import load_audio
    from liteasr.compress import CompressConfig, select_calibration
    from liteasr.eval import read_manifest, score
    from liteasr.hf import export
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)

    paths, cal_ids = select_calibration(SPEECH_DEV, args.calibration_clips)
    rest = sorted(read_manifest(SPEECH_DEV, exclude=cal_ids), key=lambda c: c.id)
    rest = [c for c in rest if c.duration <= 30.0]
    clips = [rest[i * len(rest) // args.clips] for i in range(min(args.clips, len(rest)))]
    audio = [load_audio(c.audio) for c in clips]

    model = liteasr.load_model(args.model, "cpu", torch.float32)
    t = time.perf_counter()
    plan = liteasr.compress(model, paths, CompressConfig(threshold=args.preset, progress=False), ids=cal_ids)
    compress_s = time.perf_counter() - t
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        lite_dir = liteasr.save(model, Path(tmp) / "lite", dtype=torch.float32)
        remote_dir = export(model, Path(tmp) / "remote", base_model=args.model, save_dtype=torch.float32)
        forced = {"language": "en", "task": "transcribe"}

        t = time.perf_counter()
        texts = [r["text"] for r in model.transcribe(audio, batch_size=8, **forced)]
        results["liteasr transcribe (greedy)"] = (texts, time.perf_counter() - t)
        asr = pipeline("automatic-speech-recognition", model=str(lite_dir), dtype=torch.float32)
        for label, extra in (("transformers pipeline, num_beams=1", {"num_beams": 1}),
                             ("transformers pipeline, its default (num_beams=5)", {})):
            t = time.perf_counter()
            out = asr([a.copy() for a in audio], batch_size=8, generate_kwargs=forced | extra)
            results[label] = ([r["text"].strip() for r in out], time.perf_counter() - t)
        loads = {how: load_seconds(d, how) for how, d in (("liteasr", lite_dir), ("transformers", lite_dir),
                                                            ("remote-code", remote_dir))}

    ours = results["liteasr transcribe (greedy)"][0]
    rows = {}
    for label, (texts, wall) in results.items():
        rows[label] = {"wer": score(clips, texts)["overall"]["error_rate"], "wall_s": wall,
                       "identical_to_liteasr": sum(a == b for a, b in zip(ours, texts)),
                       "texts": dict(zip((c.id for c in clips), texts))}
    print(f"\n{args.model} compressed with preset {args.preset} on {len(cal_ids)} calibration clips "
          f"({compress_s:.0f} s; {len(plan.ranks)} of {len(plan.layers)} encoder linears factored, "
          f"{100 * plan.sizes()['linear_params_after'] / plan.sizes()['linear_params_before']:.1f} % of the "
          f"linear parameters); "
          f"{len(clips)} held-out speech-dev clips, float32 CPU, batch 8, language en\n")
    print("| path | corpus WER % | wall s | transcripts identical to liteasr |")
    print("| --- | ---: | ---: | ---: |")
    for label, r in rows.items():
        print(f"| {label} | {100 * r['wer']:.2f} | {r['wall_s']:.1f} | {r['identical_to_liteasr']}/{len(clips)} |")
    print("\n| load path (fresh process, min of 3) | seconds |\n| --- | ---: |")
    for how, s in loads.items():
        print(f"| {how} | {s:.2f} |")
    report = {"model": args.model, "preset": args.preset, "calibration": cal_ids, "clips": [c.id for c in clips],
              "compress_s": compress_s, "paths": rows, "load_s": loads, "threads": torch.get_num_threads()}
    out = Path(args.output or f"docs/results/hf-interop-{Path(args.model).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
