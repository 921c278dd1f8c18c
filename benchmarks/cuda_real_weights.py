"""Real-weight check of the CUDA fast path: a compressed real model transcribes the same clips
identically on the CUDA path and on the CPU path.

Two steps, because the GPU machine has no network and no ../shared:

    # here (CPU): compress, pick the speech-dev check clips, write the CPU transcripts and a bundle
    .venv/bin/python benchmarks/cuda_real_weights.py prepare --model tiny.en-lite-a --out .gpu/real
    # on the GPU machine, in the bundle
    python benchmarks/cuda_real_weights.py check --bundle .gpu/real --json out.json

`prepare` decodes the clips (the tests' `check_clips` rule: every 15th speech-dev clip of at most
30 s, one per missing domain, JFK) into one int16 array file (the GPU machine has no libsndfile;
the FLACs are 16-bit, so int16 / 32768 is exactly what `load_audio` returns, which `prepare`
asserts), copies the model directory into the bundle and records, per clip, the transcript of the
CPU path (fp32, `model.transcribe`, batch 8). `check` loads the same model
on CUDA and transcribes the same arrays three ways: the fast path (fused encoder + CUDA-graph
decoder) in float32 with TF32 off, the fast path in float16, and the eager reference
(the model itself rather than a CudaRuntime) in float16. It prints, per way, how many transcripts equal the CPU
path's, every differing pair, the corpus WER of both against the human transcripts (where jiwer
is installed; `wer` recomputes it here from the JSON) and the wall time. The model file may travel in byte ranges (`--split-mib`): `check` joins
model.safetensors.partN back in order and verifies its SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pcm  # benchmarks/pcm.py

SPEECH_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speech-dev" / "manifest.jsonl"
CHECK_STRIDE = 15  # the same rule as tests/conftest.py::check_clips
JFK_ID = "jfk_inaugural"


def check_clip_rows(manifest: Path) -> list[dict]:
    rows = sorted((json.loads(line) for line in manifest.read_text().splitlines() if line.strip()),
                  key=lambda r: r["id"])
    rows = [r for r in rows if r["duration_s"] <= 30.0]
    chosen = rows[::CHECK_STRIDE]
    domains = {r["domain"] for r in chosen}
    for r in rows:
        if r["domain"] not in domains:
            chosen.append(r)
            domains.add(r["domain"])
    if not any(r["id"] == JFK_ID for r in chosen):
        chosen += [r for r in rows if r["id"] == JFK_ID]
    return chosen


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare(args) -> None:
    import torch

    import liteasr
    from liteasr.audio import load_audio

    manifest = Path(args.manifest)
    rows = check_clip_rows(manifest)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(args.model, out / "model")
    weights = out / "model" / "model.safetensors"
    digest = sha256(weights)
    if args.split_mib:
        # byte ranges of at most split-mib MiB each: model.safetensors.part1, part2, ...
        data, size = weights.read_bytes(), args.split_mib << 20
        for i in range(0, len(data), size):
            (out / f"part{i // size + 1}").mkdir(exist_ok=True)
            (out / f"part{i // size + 1}" / f"model.safetensors.part{i // size + 1}").write_bytes(data[i: i + size])
        weights.unlink()
    arrays = [load_audio(manifest.parent / r["audio"]) for r in rows]
    pcm.save(out / "audio.npz", arrays, [r["audio"] for r in rows])
    clips = [{"id": r["id"], "text": r["text"], "domain": r["domain"]} for r in rows]
    model = liteasr.load_model(args.model, "cpu", torch.float32)
    t = time.perf_counter()
    texts = [r["text"] for r in model.transcribe(arrays, batch_size=8)]
    cpu_s = time.perf_counter() - t
    for c, text in zip(clips, texts):
        c["cpu_text"] = text
    (out / "bundle.json").write_text(json.dumps(
        {"model_sha256": digest, "cpu": {"dtype": "float32", "threads": torch.get_num_threads(), "wall_s": cpu_s},
         "clips": clips}, indent=1, ensure_ascii=False))
    print(f"bundle in {out}: {len(clips)} clips, model sha256 {digest[:12]}, CPU path {cpu_s:.1f} s")


def _join_parts(bundle: Path, search: list[Path], digest: str) -> None:
    weights = bundle / "model" / "model.safetensors"
    if weights.exists():
        return
    parts = sorted((p for d in search for p in d.glob("part*/model.safetensors.part*")),
                   key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if not parts:
        raise SystemExit(f"{weights} is missing and no model.safetensors.partN was found under {search}")
    tmp = weights.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    if sha256(tmp) != digest:
        tmp.unlink()
        raise SystemExit(f"joined {[str(p) for p in parts]} but the SHA-256 differs from the bundle's: a part is missing")
    os.replace(tmp, weights)


def corpus_wer(clips: list[dict], texts: list[str]) -> float | None:
    """Corpus WER after Whisper's English normaliser, or None where jiwer is not installed."""
    try:
        import jiwer
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError:
        return None
    norm = EnglishTextNormalizer()
    pairs = [(norm(c["text"]), norm(t)) for c, t in zip(clips, texts) if norm(c["text"])]
    return jiwer.wer([r for r, _ in pairs], [h for _, h in pairs])


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def check(args) -> None:
    import torch

    import liteasr

    bundle = Path(args.bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    _join_parts(bundle, [bundle] + [Path(p) for p in args.parts_dir], meta["model_sha256"])
    clips = meta["clips"]
    arrays = pcm.load(bundle / "audio.npz")

    def wer(texts: list[str]) -> float | None:
        return corpus_wer(clips, texts)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "clips": len(clips),
              "cpu_wer": wer([c["cpu_text"] for c in clips]), "ways": {}}
    ways = [("cuda fast path, float32 (TF32 off)", torch.float32, ""),
            ("cuda fast path, float16", torch.float16, ""),
            ("cuda eager reference, float16", torch.float16, "eager")]
    for name, dtype, runtime in ways:
        from liteasr.cuda import CudaRuntime

        model = liteasr.load_model(bundle / "model", "cuda", dtype)
        model = model if runtime == "eager" else CudaRuntime(model)
        model.transcribe(arrays[:8], batch_size=8)  # warm-up: builds the runtime and captures its graphs
        torch.cuda.synchronize()
        t = time.perf_counter()
        texts = [r["text"] for r in model.transcribe(arrays, batch_size=8)]
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        diffs = [{"id": c["id"], "cpu": c["cpu_text"], "cuda": x} for c, x in zip(clips, texts) if x != c["cpu_text"]]
        report["ways"][name] = {"identical": len(clips) - len(diffs), "wer": wer(texts), "wall_s": wall,
                                "texts": texts, "diffs": diffs}
        print(f"{name}: {len(clips) - len(diffs)}/{len(clips)} transcripts identical to the CPU path; "
              f"WER {_pct(wer(texts))} (CPU path {_pct(report['cpu_wer'])}); {wall:.2f} s")
        for d in diffs:
            print(f"   {d['id']}\n     cpu : {d['cpu']}\n     cuda: {d['cuda']}")
        del model
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="CPU side: bundle the model, the check clips and the CPU transcripts")
    p.add_argument("--model", required=True, help="a model directory liteasr loads (saved by liteasr: model.safetensors)")
    p.add_argument("--manifest", default=str(SPEECH_DEV))
    p.add_argument("--out", required=True)
    p.add_argument("--split-mib", type=int, default=0, help="split model.safetensors into parts of this many MiB")
    c = sub.add_parser("check", help="GPU side: transcribe the bundle on CUDA and compare")
    c.add_argument("--bundle", required=True)
    c.add_argument("--parts-dir", nargs="*", default=[], help="more folders holding partN/ subfolders")
    c.add_argument("--json", default=None)
    w = sub.add_parser("wer", help="here: the WER of each way of a check report")
    w.add_argument("--bundle", required=True)
    w.add_argument("--json", required=True)
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args)
    elif args.cmd == "check":
        check(args)
    else:  # wer: recompute the WER columns of a check report here, where jiwer is installed
        meta = json.loads((Path(args.bundle) / "bundle.json").read_text())
        report = json.loads(Path(args.json).read_text())
        print(f"CPU path: WER {_pct(corpus_wer(meta['clips'], [c['cpu_text'] for c in meta['clips']]))}")
        for name, way in report["ways"].items():
            print(f"{name}: {way['identical']}/{len(meta['clips'])} identical; WER {_pct(corpus_wer(meta['clips'], way['texts']))}")


if __name__ == "__main__":
    main()
