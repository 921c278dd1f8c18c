"""FP8 accuracy gate on real weights, on the CPU: base and a compressed base transcribe the speech-dev check clips
(the tests' `check_clips`: every 15th clip of at most 30 s by id, plus one per missing domain, plus JFK) with their
encoder linears in FP8 E4M3 (liteasr.cuda.fp8 through fast_encoder, the very modules the GPU runs; the CPU's
torch._scaled_mm does the same arithmetic — E4M3 operands, float32 products and sums — so the rounding that can
cost words is the same), against the float32 model; and the encoder-output error against float32 on a few clips,
next to float16's (CPU fp16 eager).

    .venv/bin/python benchmarks/fp8_wer.py --model base --model out/base-lite-c --json docs/results/fp8-wer-base.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import liteasr
from liteasr.audio import load_audio, log_mel_spectrogram, pad_or_trim
from liteasr.cuda.runtime import fast_encoder
from liteasr.eval import read_manifest, score

SPEECH_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speech-dev" / "manifest.jsonl"


def check_clips(manifest: Path):
    """tests/conftest.py's check_clips, on liteasr.eval.Clip rows."""
    rows = sorted((c for c in read_manifest(manifest) if c.duration <= 30.0), key=lambda c: c.id)
    chosen = rows[::15]
    domains = {c.domain for c in chosen}
    for c in rows:
        if c.domain not in domains:
            chosen.append(c)
            domains.add(c.domain)
    chosen += [c for c in rows if c.id == "jfk_inaugural" and c not in chosen]
    return chosen


def with_encoder(model, encoder):
    m = copy.copy(model)
    m._modules = dict(model._modules)
    m.encoder = encoder
    return m


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--manifest", default=str(SPEECH_DEV))
    ap.add_argument("--error-clips", type=int, default=3, help="clips for the encoder-error table (0: skip it)")
    ap.add_argument("--clips", type=int, default=None, help="only the first N check clips (a busy machine)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clips = check_clips(Path(a.manifest))[: a.clips]
    arrays = [load_audio(c.audio) for c in clips]
    report = {"clips": [c.id for c in clips], "models": {}}
    for name in a.model:
        model = liteasr.load_model(name, "cpu", torch.float32)
        forced = {"language": "en", "task": "transcribe"} if model.is_multilingual else {}
        variants = {"fp32": model.encoder}
        factored = any(model.low_rank_config)
        for fp8 in ("dense", "all") if factored else ("dense",):  # "all" is "dense" for a dense model
            variants[f"fp8 {fp8}"] = fast_encoder(model.encoder, fp8=fp8)
        rows = {}
        if a.error_clips:
            mel = torch.stack([log_mel_spectrogram(torch.from_numpy(pad_or_trim(x)), model.dims.num_mel_bins)
                               for x in arrays[: a.error_clips]])
            with torch.inference_mode():
                exact = copy.deepcopy(model.encoder).double()(mel.double())
                rows["fp16 error"] = rel(copy.deepcopy(model.encoder).half()(mel.half()), exact)
                for v, enc in variants.items():
                    rows[f"{v} error"] = rel(enc(mel), exact)
        for v, enc in variants.items():
            t = time.perf_counter()
            texts = [r["text"] for r in with_encoder(model, enc).transcribe(arrays, batch_size=8, **forced)]
            rows[f"{v} wer"] = score(clips, texts)["overall"]["error_rate"] * 100
            rows[f"{v} texts"] = texts
            print(f"{name}: {v}: WER {rows[f'{v} wer']:.2f} % ({time.perf_counter() - t:.0f} s)", flush=True)
        if a.error_clips:
            print(f"{name}: encoder error vs fp64 on {a.error_clips} clips: " + ", ".join(
                f"{k.removesuffix(' error')} {v:.2e}" for k, v in rows.items() if k.endswith("error")), flush=True)
        report["models"][name] = rows
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
