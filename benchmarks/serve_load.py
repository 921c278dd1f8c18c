"""Load test of `liteasr serve`: requests/s, audio-s/s and latency percentiles at several client counts, with
and without batching across requests, next to offline batched `transcribe()` of the same clips (and, with
--faster-whisper, faster-whisper transcribing them one request at a time, as speaches serves them).

    .venv/bin/python benchmarks/serve_load.py --model tiny.en --clients 1 8 32 --requests 32 --clips 32
    .venv/bin/python benchmarks/serve_load.py --model base --device cuda --clients 1 8 32 64 --requests 256 \\
        --clips 256 --long-s 600 --max-batch-size 32 --output serve-gpu.json      # on the GPU machine (no network)

For each server mode (--modes: "batching" serves with --max-batch-size B, "no-batching" with B = 1, i.e.
`liteasr serve --max-batch-size 1`; both by default) the script starts `python -m liteasr serve` as a subprocess
on a free port, warms it up, then for each client count C runs a closed loop: C threads each send a clip
(multipart, as the openai client does), wait for the answer, send the next, until --requests requests are done.
The clips are speech-dev clips of at most 30 s (--clips N of them, evenly spaced over the sorted list), sent
round-robin. With --long-s S, one extra client sends a file of S seconds made by concatenating clips, once, at
the start of each client count ("long-file" column): its latency is reported separately and the short clips'
latencies show what it costs them. Every answer's text is checked against the offline transcription of the same
clip (a "mismatch" otherwise).

On the GPU machine (no network, no ../shared, no fastapi/uvicorn/soundfile): `prepare` here writes a bundle
(the chosen clips as FLAC files + manifest, the model saved in float16 with its weights file cut into byte
ranges of at most --split-mib MiB, since one call carries 64 MiB); the wheels of the serve extra and soundfile
travel in .whl (see docs/serving.md for the exact calls):

    .venv/bin/python benchmarks/serve_load.py prepare --model base --clips 128 --out .gpu/serve --split-mib 40
    python3 benchmarks/serve_load.py --bundle .gpu/serve --parts-dir .gpu/p1 --device cuda ...

Offline: `transcribe(model, all clips, batch_size=B)` in this process, after the servers are gone, with the
same torch thread count (--threads; the server gets it through OMP_NUM_THREADS). RTFx = audio s / wall s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPEECH_DEV = REPO.parent / "shared" / "data" / "speech-dev" / "manifest.jsonl"


def pick_clips(manifest: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    rows = sorted((r for r in rows if r["duration_s"] <= 30.0), key=lambda r: r["id"])
    rows = [rows[i * len(rows) // n] for i in range(min(n, len(rows)))]
    for r in rows:
        r["path"] = str(manifest.parent / r["audio"])
    return rows


def long_file(clips: list[dict], seconds: float, folder: Path) -> tuple[str, float]:
    """A wav of at least `seconds` made of the clips in a loop (16-bit PCM, 16 kHz)."""
    import soundfile as sf

    from liteasr.audio import SAMPLE_RATE, load_audio

    parts, total, i = [], 0.0, 0
    while total < seconds:
        audio = load_audio(clips[i % len(clips)]["path"])
        parts.append(audio)
        total += len(audio) / SAMPLE_RATE
        i += 1
    path = folder / f"long-{int(seconds)}s.wav"
    sf.write(path, np.concatenate(parts), SAMPLE_RATE, subtype="PCM_16")
    return str(path), total


class ServerProcess:
    """`python -m liteasr serve` on a free port, stopped with SIGTERM."""

    def __init__(self, args, max_batch_size: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "liteasr", "serve", "--model", args.model, "--device", args.device,
               "--port", str(self.port), "--max-batch-size", str(max_batch_size), "--max-wait-ms",
               str(args.max_wait_ms), "--max-queue", str(4 * max(args.clients) + 8), "--log-level", "warning",
               "--request-timeout-s", "3600"]
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(args.threads)}
        self.proc = subprocess.Popen(cmd, env=env)
        t0 = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > 600:
                raise RuntimeError(f"server did not start ({' '.join(cmd)})")
            time.sleep(0.2)

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if not s.labels or s.name.startswith(("liteasr_windows", "liteasr_audio_seconds"))}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def transcribe_request(port: int, path: str, model: str) -> str:
    """POST /v1/audio/transcriptions as the openai client sends it (multipart: file, model); the text. Plain
    http.client, so that the GPU machine needs no openai package and the load generator stays light."""
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{Path(path).name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n")
    body = head.encode() + Path(path).read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    try:
        conn.request("POST", "/v1/audio/transcriptions", body=body,
                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data}")
    return data["text"]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_load(server: ServerProcess, model: str, clips: list[dict], clients: int, requests: int,
             expected: dict[str, str], long: tuple[str, float] | None) -> dict:
    """`requests` requests from `clients` closed-loop clients (plus one long-file client when `long`)."""
    todo = iter(range(requests))
    lock = threading.Lock()
    latencies, mismatches, errors = [], [], []

    def send(path: str) -> tuple[float, str]:
        t0 = time.perf_counter()
        text = transcribe_request(server.port, path, model)
        return time.perf_counter() - t0, text

    def worker() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            clip = clips[i % len(clips)]
            try:
                dt, text = send(clip["path"])
            except Exception as e:  # counted, the load goes on
                errors.append(f"{type(e).__name__}: {e}")
                continue
            latencies.append(dt)
            if text != expected[clip["path"]]:
                mismatches.append(clip["id"])

    before = server.metrics()
    long_latency = []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients + 1) as pool:
        if long is not None:
            pool.submit(lambda: long_latency.append(send(long[0])[0]))
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    after = server.metrics()
    audio = sum(clips[i % len(clips)]["duration_s"] for i in range(requests)) + (long[1] if long else 0.0)
    batches = after["liteasr_batch_size_count"] - before["liteasr_batch_size_count"]
    windows = after["liteasr_batch_size_sum"] - before["liteasr_batch_size_sum"]
    return {"clients": clients, "requests": requests, "long_s": long[1] if long else 0.0, "wall_s": wall,
            "requests_per_s": len(latencies) / wall, "audio_s_per_s": audio / wall,
            "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "p99_s": percentile(latencies, 99), "long_latency_s": long_latency[0] if long_latency else None,
            "mean_batch": windows / max(batches, 1), "errors": len(errors), "first_errors": errors[:3],
            "mismatches": len(mismatches)}


def offline(args, clips: list[dict], batch_size: int) -> tuple[dict, dict[str, str]]:
    """Offline batched transcribe() of the clips (after a warm-up batch): throughput and the texts."""
    import torch

    from liteasr.serve import load_models
    from liteasr.transcribe import transcribe

    torch.set_num_threads(args.threads)
    model = load_models([args.model], args.device)[args.model]  # what the server runs (a CudaRuntime on CUDA)

    paths = [c["path"] for c in clips]
    transcribe(model, paths[:batch_size], batch_size=batch_size)  # warm-up (graphs, allocator)
    t0 = time.perf_counter()
    out = transcribe(model, paths, batch_size=batch_size)
    wall = time.perf_counter() - t0
    audio = sum(c["duration_s"] for c in clips)
    row = {"requests": len(clips), "wall_s": wall, "requests_per_s": len(clips) / wall, "audio_s_per_s": audio / wall,
           "batch_size": batch_size}
    return row, {p: r["text"] for p, r in zip(paths, out)}


def faster_whisper_sequential(args, clips: list[dict]) -> dict:
    """faster-whisper on the same model directory (CTranslate2 weights), one clip at a time, greedy."""
    from faster_whisper import WhisperModel

    from liteasr.fetch import fetch_model

    model = WhisperModel(str(fetch_model(args.model)), device=args.device, compute_type="float32" if
                         args.device == "cpu" else "float16", cpu_threads=args.threads)
    list(model.transcribe(clips[0]["path"], beam_size=1)[0])  # warm-up
    t0 = time.perf_counter()
    latencies = []
    for c in clips:
        t1 = time.perf_counter()
        list(model.transcribe(c["path"], beam_size=1, language="en" if args.model.endswith(".en") else None)[0])
        latencies.append(time.perf_counter() - t1)
    wall = time.perf_counter() - t0
    return {"requests": len(clips), "wall_s": wall, "requests_per_s": len(clips) / wall,
            "audio_s_per_s": sum(c["duration_s"] for c in clips) / wall, "p50_s": percentile(latencies, 50)}


def table(result: dict) -> str:
    lines = ["| server | clients | requests | req/s | audio-s/s | p50 s | p95 s | p99 s | mean batch | long-file s |"
             " errors | mismatches |", "| --- " + "| ---: " * 11 + "|"]
    for mode, rows in result["load"].items():
        for r in rows:
            long = f"{r['long_latency_s']:.1f} ({r['long_s']:.0f} s)" if r["long_latency_s"] else "-"
            lines.append(f"| {mode} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | "
                         f"{r['audio_s_per_s']:.1f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['p99_s']:.2f} | "
                         f"{r['mean_batch']:.1f} | {long} | {r['errors']} | {r['mismatches']} |")
    o = result["offline"]
    lines.append(f"| offline transcribe(batch {o['batch_size']}) | - | {o['requests']} | {o['requests_per_s']:.2f} | "
                 f"{o['audio_s_per_s']:.1f} | - | - | - | - | - | - | - |")
    if result.get("faster_whisper"):
        f = result["faster_whisper"]
        lines.append(f"| faster-whisper, one at a time | 1 | {f['requests']} | {f['requests_per_s']:.2f} | "
                     f"{f['audio_s_per_s']:.1f} | {f['p50_s']:.2f} | - | - | 1 | - | - | - |")
    return "\n".join(lines)


def prepare(argv: list[str]) -> None:
    """Write the GPU bundle: manifest.jsonl + audio/ (the clips), model/ (float16, weights cut into partN/)."""
    import shutil

    import torch

    import liteasr
    from cuda_real_weights import sha256  # benchmarks/cuda_real_weights.py: the same bundle convention

    p = argparse.ArgumentParser(prog="serve_load.py prepare")
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--manifest", type=Path, default=SPEECH_DEV)
    p.add_argument("--clips", type=int, default=128)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split-mib", type=int, default=40)
    args = p.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    (args.out / "audio").mkdir(parents=True)
    clips = pick_clips(args.manifest, args.clips)
    for c in clips:
        shutil.copy(c["path"], args.out / "audio" / Path(c["path"]).name)
        c["audio"] = f"audio/{Path(c['path']).name}"
    lines = [json.dumps({k: c[k] for k in ("id", "audio", "text", "duration_s")}) for c in clips]
    (args.out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    liteasr.save(liteasr.load_model(args.model, "cpu", torch.float32), args.out / "model", dtype=torch.float16)
    weights = args.out / "model" / "model.safetensors"
    digest, data, size = sha256(weights), weights.read_bytes(), args.split_mib << 20
    for i in range(0, len(data), size):
        part = args.out / f"part{i // size + 1}"
        part.mkdir()
        (part / f"model.safetensors.part{i // size + 1}").write_bytes(data[i: i + size])
    weights.unlink()
    (args.out / "bundle.json").write_text(json.dumps({"model": args.model, "model_sha256": digest}) + "\n")
    print(f"bundle in {args.out}: {len(clips)} clips, {len(range(0, len(data), size))} weight parts; carry each "
          f"partN in its own call (64 MiB per call), the rest with the last")


def open_bundle(bundle: Path, parts_dirs: list[Path]) -> tuple[str, Path]:
    """(model directory, manifest) of a bundle, its weights joined from the partN/ folders found in `bundle`
    and `parts_dirs` (left on the machine by earlier calls) and checked against the recorded SHA-256."""
    from cuda_real_weights import _join_parts

    meta = json.loads((bundle / "bundle.json").read_text())
    _join_parts(bundle, [bundle, *parts_dirs], meta["model_sha256"])
    return str(bundle / "model"), bundle / "manifest.jsonl"


def main() -> None:
    if sys.argv[1:2] == ["prepare"]:
        return prepare(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--device", default="cpu")
    p.add_argument("--manifest", type=Path, default=SPEECH_DEV)
    p.add_argument("--clips", type=int, default=32, help="distinct speech-dev clips (<= 30 s) sent round-robin")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--requests", type=int, default=64, help="requests per client count (at least the clients)")
    p.add_argument("--long-s", type=float, default=0.0, help="also run a mix with one file this long (0: off)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--modes", nargs="+", default=["batching", "no-batching"], choices=["batching", "no-batching"])
    p.add_argument("--threads", type=int, default=1, help="torch threads of server and offline run")
    p.add_argument("--faster-whisper", action="store_true", help="also time faster-whisper, one clip at a time")
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--bundle", type=Path, default=None, help="a `prepare` bundle: its model and clips")
    p.add_argument("--parts-dir", type=Path, nargs="*", default=[], help="more folders holding bundle partN/")
    args = p.parse_args()
    if args.bundle:
        args.model, args.manifest = open_bundle(args.bundle, args.parts_dir)

    clips = pick_clips(args.manifest, args.clips)
    off, expected = offline(args, clips, args.max_batch_size)
    result = {"model": args.model, "device": args.device, "threads": args.threads, "host": platform.node(),
              "cpu_count": os.cpu_count(), "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
              "clips": len(clips), "clip_audio_s": sum(c["duration_s"] for c in clips), "load": {}, "offline": off}
    with tempfile.TemporaryDirectory() as tmp:
        long = long_file(clips, args.long_s, Path(tmp)) if args.long_s else None
        for mode in args.modes:
            server = ServerProcess(args, args.max_batch_size if mode == "batching" else 1)
            try:
                # warm-up; on CUDA at every client count, so that the runtime captures its graphs for the batch
                # buckets before timing (CPU has no graphs to capture, and its windows are expensive)
                for c in (args.clients if args.device.startswith("cuda") else [1]):
                    run_load(server, args.model, clips, c, max(c, 2), expected, None)
                rows = []
                for c in args.clients:
                    rows.append(run_load(server, args.model, clips, c, max(args.requests, c), expected, None))
                    print(json.dumps({"mode": mode, **rows[-1]}), flush=True)
                    if long is not None:
                        rows.append(run_load(server, args.model, clips, c, max(args.requests, c), expected, long))
                        print(json.dumps({"mode": mode, **rows[-1]}), flush=True)
                result["load"][mode] = rows
            finally:
                server.stop()
    if args.faster_whisper:
        result["faster_whisper"] = faster_whisper_sequential(args, clips)
    print(table(result))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
