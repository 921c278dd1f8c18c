"""Overhead of the Ray corpus pipeline against in-process `transcribe` on the same clips, timed side by side.

    # CPU (this machine): one transcriber worker with T threads vs in-process transcribe with T threads
    python benchmarks/ray_overhead.py --clips 240 --threads 2 --repeats 3
    # GPU (one H200, no network): Ray and the clips travel as benchmarks/ray_gpu_bundle.sh packs them
    bash benchmarks/ray_gpu_run.sh 16000     # on the lent machine, after the bundle's first call

After an untimed warm-up of both on 8 clips, each repeat runs both paths back to back (in-process first, then
Ray), so that machine load drifts hit both; the medians are compared. In-process: load the model (and CudaRuntime) + transcribe(model, paths). Ray:
the whole `transcribe_stream` — read/resample tasks, the worker actor starting and loading the model, batches
through the object store, stitching on the driver — but not `ray.init` (a cluster is started once per run
of the CLI; its time is printed separately). The transcripts of both paths are checked to be equal.

Without Ray installed, or with --bundle (arrays, no files to read), the script runs the in-process side
against the worker side without Ray: the clips cut into pieces as `read_pieces` cuts them and fed through
`Transcriber` batches exactly as Ray Data feeds them: what a worker does beyond in-process transcribe,
not Ray's scheduling and object store.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

SPEECH_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech-dev" / "manifest.jsonl"


def clips(manifest: Path, n: int) -> list[tuple[str, str]]:
    """(id, path) of n clips of the manifest, repeating it when n exceeds its length (ids made unique)."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    return [(f"{rows[i % len(rows)]['id']}#{i // len(rows)}", str(manifest.parent / rows[i % len(rows)]["audio"]))
            for i in range(n)]


def in_process(spec, paths: list, options) -> tuple[float, list[str]]:
    from liteasr.transcribe import transcribe_iter

    t0 = time.perf_counter()
    model = spec.load()
    texts = [""] * len(paths)
    for i, r in transcribe_iter(model, paths, options):
        texts[i] = r["text"] if isinstance(r, dict) else f"ERROR {r}"
    return time.perf_counter() - t0, texts


def on_ray(spec, items: list[tuple[str, str]], options, ray_options) -> tuple[float, list[str]]:
    from liteasr.distributed.pipeline import Entry, transcribe_stream

    t0 = time.perf_counter()
    got = {}
    for cid, r in transcribe_stream(spec, [Entry(c, p) for c, p in items], options, ray_options):
        got[cid] = r["text"] if isinstance(r, dict) else f"ERROR {r}"
    return time.perf_counter() - t0, [got[c] for c, _ in items]


def worker_side(spec, items: list[tuple[str, object]], options) -> tuple[float, list[str]]:
    """What one Ray worker does, without Ray: pieces as bytes, Transcriber batches of batch_size."""
    import numpy as np

    from liteasr.distributed.pipeline import read_pieces
    from liteasr.distributed.transcriber import Transcriber

    t0 = time.perf_counter()
    worker = Transcriber(spec, options)
    rows = []
    for c, audio in items:
        if isinstance(audio, str):
            rows += read_pieces({"id": c, "path": audio, "language": ""}, options.chunk_s)
        else:  # a bundle's array: the piece read_pieces would make of it
            rows.append({"id": c, "path": c, "language": "", "first": 0, "num_samples": len(audio), "pieces": 1,
                         "audio": audio.tobytes(), "error": ""})
    texts = {}
    for i in range(0, len(rows), options.batch_size):
        chunk = rows[i: i + options.batch_size]
        batch = {k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]}
        out = worker(batch)
        for cid, res, err in zip(out["id"], out["result"], out["error"]):
            texts[cid] = json.loads(res)["text"] if not err else f"ERROR {err}"
    return time.perf_counter() - t0, [texts[c] for c, _ in items]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--manifest", type=Path, default=SPEECH_DEV)
    ap.add_argument("--clips", type=int, default=240)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in-process = CPUs of the Ray worker")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-cpus", type=int, default=4, help="CPUs of the local Ray")
    ap.add_argument("--write-bundle", type=Path, default=None, help="write the clips as an int16 bundle and stop")
    ap.add_argument("--bundle", type=Path, default=None, help="clips from a bundle (the GPU machine)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import pcm

    if args.write_bundle:
        from liteasr.audio import load_audio

        items = clips(args.manifest, args.clips)
        args.write_bundle.parent.mkdir(parents=True, exist_ok=True)
        pcm.save(args.write_bundle, [load_audio(p) for _, p in items], [c for c, _ in items])
        print(f"wrote {args.write_bundle} ({len(items)} clips)")
        return

    import torch

    from liteasr.distributed.transcriber import ModelSpec
    from liteasr.transcribe import TranscribeOptions

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    spec = ModelSpec(args.model, device=args.device)
    options = TranscribeOptions(batch_size=args.batch_size)
    if args.bundle:
        arrays = pcm.load(args.bundle)
        items = [(f"clip{i}", a) for i, a in enumerate(arrays)]
    else:
        items = clips(args.manifest, args.clips)
    paths = [p for _, p in items]
    try:
        import ray  # noqa: F401

        have_ray = not args.bundle
    except ImportError:
        have_ray = False
    if not have_ray:
        print("timing the worker side without Ray (no ray installed, or --bundle; see the docstring)")
    if have_ray:
        from liteasr.distributed import RayOptions, connect

        ray_options = RayOptions(num_cpus=args.num_cpus, workers=1, cpus_per_worker=args.threads,
                                 gpus_per_worker=1.0 if cuda else 0.0)
        t0 = time.perf_counter()
        connect(ray_options)
        print(f"ray.init: {time.perf_counter() - t0:.1f} s (not counted)")
    audio_s = sum(len(p) / 16000 if not isinstance(p, str) else __import__("soundfile").info(p).duration
                  for p in paths)
    print(f"{len(items)} clips, {audio_s / 60:.1f} min of audio, {args.model} on {args.device}, batch "
          f"{args.batch_size}, {args.threads} threads; load average {os.getloadavg()[0]:.2f} before")
    # Untimed warm-up of both sides on a few clips: process-wide first-time costs (CUDA context, kernel
    # compilation, Ray worker start-up, file caches) would otherwise land on the first timed run only.
    in_process(spec, paths[:8], options)
    (on_ray(spec, items[:8], options, ray_options) if have_ray else worker_side(spec, items[:8], options))
    local_s, dist_s = [], []
    for r in range(args.repeats):
        t_local, texts_local = in_process(spec, paths, options)
        if have_ray:
            t_dist, texts_dist = on_ray(spec, items, options, ray_options)
        else:
            t_dist, texts_dist = worker_side(spec, items, options)
        same = sum(a == b for a, b in zip(texts_local, texts_dist))
        local_s.append(t_local)
        dist_s.append(t_dist)
        print(f"repeat {r}: in-process {t_local:.1f} s, {'ray' if have_ray else 'worker side'} {t_dist:.1f} s "
              f"({100 * (t_dist / t_local - 1):+.1f} %), identical transcripts {same}/{len(items)}; "
              f"load average {os.getloadavg()[0]:.2f}")
    lm, dm = statistics.median(local_s), statistics.median(dist_s)
    print(f"median: in-process {lm:.1f} s (RTFx {audio_s / lm:.0f}), {'ray' if have_ray else 'worker side'} "
          f"{dm:.1f} s (RTFx {audio_s / dm:.0f}); overhead {100 * (dm / lm - 1):+.1f} %")


if __name__ == "__main__":
    main()
