"""Re-time every point of a sweep on an otherwise idle machine and rewrite its table and plot.

    .venv/bin/python benchmarks/sweep_latency.py docs/results/sweep-base --model base --threads 2

`liteasr sweep` times each point right after compressing it, which is honest only when nothing
else runs on the machine (two sweeps side by side on 2 cores share them). Latency depends on the
shapes only, so this script rebuilds each point from its `low_rank_config` (real dense weights
where dense, random factors where factored), and measures the encoder on one 30-s window with
the dense model and every point interleaved: round r times dense, point 1, …, point n, and the
median over rounds is reported, so that drifts of the machine hit every point alike. The speed-up
is dense median / point median. sweep.json gets `latency_ms`, `speedup` and `latency_note`;
sweep.md and sweep.png are rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import liteasr
from liteasr.model import Whisper
from liteasr.compress.sweep import plot, report_md, table


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir")
    ap.add_argument("--model", required=True, help="the dense model the sweep started from")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = Path(args.sweep_dir) / "sweep.json"
    data = json.loads(path.read_text())
    rows = data["rows"]
    dense = liteasr.load_model(args.model, "cpu", torch.float32).eval()
    models: list[Whisper] = []
    for r in rows:
        m = Whisper(dense.dims, r["low_rank_config"] if any(r["low_rank_config"]) else None).eval()
        state = {k: v for k, v in dense.state_dict().items() if k in m.state_dict()
                 and m.state_dict()[k].shape == v.shape}
        m.load_state_dict(state, strict=False)  # factored weights stay at their (random) init
        models.append(m)
    mel = torch.randn(1, dense.dims.num_mel_bins, 3000, generator=torch.Generator().manual_seed(0))
    for m in models:  # warm-up
        m.encoder(mel)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(args.rounds):
        for i, m in enumerate(models):
            t = time.perf_counter()
            m.encoder(mel)
            times[i].append((time.perf_counter() - t) * 1000)
    dense_ms = statistics.median(times[0])
    load = os.getloadavg()[0]
    note = (f"CPU, {torch.get_num_threads()} threads, batch 1, median of {args.rounds} interleaved rounds "
            f"(benchmarks/sweep_latency.py; load average {load:.1f})")
    for r, t in zip(rows, times):
        r["latency_ms"] = statistics.median(t)
        r["speedup"] = dense_ms / r["latency_ms"]
        r["latency_note"] = note
    tmp = path.with_name(".sweep.json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    (path.parent / "sweep.md").write_text(report_md(rows))
    plot(rows, path.parent / "sweep.png")
    print(table(rows))
    print(note)


if __name__ == "__main__":
    main()
