"""CPU encoder latency of a dense model and its LiteASR-compressed versions, PyTorch next to MLX, in one run.

    .venv/bin/python benchmarks/mlx_latency.py                  # base; presets b and c; 32 speech-dev clips

One calibration pass serves every preset: `liteasr.compress` is calibrate -> make_plan ->
apply_plan, and only the plan depends on the threshold. Each model is timed per 30-s window
(batch 1): one warm-up call, then the median of --repeats calls (liteasr.bench.encoder_latency on
PyTorch, liteasr.mlx.encoder_latency on MLX, which mx.eval-synchronises). In parentheses: the
speed-up over the dense model on the same backend.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
from pathlib import Path

import mlx.core as mx
import torch

import liteasr
import liteasr.mlx
from liteasr.bench import encoder_latency
from liteasr.compress import apply_plan, calibrate, footprint, make_plan, select_calibration
from liteasr.compress.plan import PRESETS

SPEECH_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speech-dev" / "manifest.jsonl"


def build(model_name: str, calibration: str, num_clips: int, presets: list[str]) -> dict[str, torch.nn.Module]:
    """{"dense": model, "preset b (0.99:0.999)": compressed copy, ...}."""
    dense = liteasr.load_model(model_name)
    paths, ids = select_calibration(calibration, num_clips)
    calib = calibrate(dense, paths, ids=ids, progress=False)
    models = {"dense": dense}
    for preset in presets:
        m = copy.deepcopy(dense)
        apply_plan(m, calib, make_plan(m, calib, preset))
        models[f"preset {preset} ({PRESETS[preset]})"] = m
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base")
    ap.add_argument("--calibration", default=str(SPEECH_DEV), help="manifest.jsonl of calibration clips")
    ap.add_argument("--num-clips", type=int, default=32)
    ap.add_argument("--presets", nargs="+", default=["b", "c"], choices=sorted(PRESETS))
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per model and backend (median)")
    ap.add_argument("--backends", nargs="+", default=["torch", "mlx"], choices=["torch", "mlx"])
    ap.add_argument("--mlx-dtype", default="float32", choices=sorted(liteasr.mlx.DTYPES))
    args = ap.parse_args()

    models = build(args.model, args.calibration, args.num_clips, args.presets)
    print(f"{args.model} encoder, one 30-s window (batch 1), median of {args.repeats} after 1 warm-up; "
          f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), mlx {mx.__version__} on {mx.default_device()}; "
          f"load average {os.getloadavg()[0]:.1f}")
    columns = {"torch": "PyTorch fp32 ms", "mlx": f"MLX {args.mlx_dtype} ms"}
    print("\n| encoder | params | " + " | ".join(columns[b] for b in args.backends) + " |")
    print("| --- | ---: |" + " ---: |" * len(args.backends))
    dense_ms: dict[str, float] = {}
    for label, m in models.items():
        cells = []
        for backend in args.backends:
            if backend == "torch":
                ms = encoder_latency(m, 1, args.repeats)
            else:
                ms = liteasr.mlx.encoder_latency(liteasr.mlx.from_torch(m, args.mlx_dtype), 1, args.repeats)
            dense_ms.setdefault(backend, ms)
            cells.append(f"{ms:.0f} ({dense_ms[backend] / ms:.2f}x)")
        params = footprint(m)["encoder_params"] / 1e6
        print(f"| {args.model} {label} | {params:.1f} M | " + " | ".join(cells) + " |", flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
    main()
