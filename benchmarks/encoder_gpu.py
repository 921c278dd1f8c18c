"""Encoder latency on a CUDA GPU, side by side in one run: transformers' dense WhisperEncoder,
liteasr dense and liteasr compressed (rank profiles), eager and CUDA-graph runtime, at several
batch sizes. Random weights with large-v3 shapes (real weights are not needed for timing).

    python3 benchmarks/encoder_gpu.py --profiles PATH/large-v3-rank-profiles.json --batch-size 1 8 32

Prints a table (ms per call, TFLOP/s achieved, % of the measured matmul ceiling, speed-ups) and
writes JSON to $OUT/encoder_gpu.json when OUT is set. Every fast path is first checked against the
eager reference on the same inputs (relative error printed).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from liteasr.bench import encoder_flops
from liteasr.model import Dims, LowRankLinear, Whisper, encoder_linears, set_module
from liteasr.runtime import EncoderRunner, optimize_encoder

LARGE_V3 = Dims(num_mel_bins=128, vocab_size=51866, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                encoder_ffn_dim=5120, decoder_layers=1, decoder_attention_heads=20, decoder_ffn_dim=5120)


def random_model(dims: Dims, low_rank: list[dict] | None, dtype: torch.dtype, seed: int = 0) -> Whisper:
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = Whisper(dims, low_rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5 if "weight1" not in name else p.shape[0] ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    return model.to(dtype).eval()


def timeit(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median ms of fn() with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def matmul_ceiling(dtype: torch.dtype) -> float:
    """TFLOP/s of an 8192³ matmul on random data."""
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    ms = timeit(lambda: a @ b, reps=20)
    return 2 * 8192**3 / ms / 1e9


def hf_encoder(dims: Dims, dtype: torch.dtype):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(num_mel_bins=dims.num_mel_bins, d_model=dims.d_model, encoder_layers=dims.encoder_layers,
                        encoder_attention_heads=dims.encoder_attention_heads, encoder_ffn_dim=dims.encoder_ffn_dim,
                        attn_implementation="sdpa")
    cfg._attn_implementation = "sdpa"
    return WhisperEncoder(cfg).to("cuda", dtype).eval()


def graphed(fn, x: torch.Tensor):
    """A callable replaying fn(x) from a CUDA graph."""
    static = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(static)
    return lambda: g.replay()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", required=True)
    ap.add_argument("--names", nargs="+", default=["uniform-c", "skewed-c"])
    ap.add_argument("--batch-size", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd layers (slow to build)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = True
    profiles = json.load(open(args.profiles))["profiles"]
    ceiling = matmul_ceiling(dtype)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, matmul ceiling {ceiling:.0f} TFLOP/s",
          flush=True)
    rows = []
    configs = [("dense", None)] + [(n, profiles[n]) for n in args.names]
    hf = hf_encoder(LARGE_V3, dtype)
    for name, profile in configs:
        model = random_model(LARGE_V3, profile, dtype)
        if name == "dense":  # transformers gets the very same dense weights
            sd = {k.removeprefix("encoder."): v for k, v in model.state_dict().items() if k.startswith("encoder.")}
            hf.load_state_dict(sd, strict=False)
        fast = optimize_encoder(copy.deepcopy(model))
        compiled = optimize_encoder(copy.deepcopy(model), compile=True) if args.compile else None
        flops = encoder_flops(model)
        for b in args.batch_size:
            mel = torch.randn(b, 128, 3000, device="cuda", dtype=dtype)
            with torch.inference_mode():
                ref = model.encoder(mel)
                err = rel_err(fast.encoder(mel), ref)
                variants = {"liteasr eager": lambda: model.encoder(mel),
                            "liteasr graph": graphed(lambda x: model.encoder(x), mel),
                            "liteasr fused+graph": graphed(lambda x: fast.encoder(x), mel)}
                if compiled is not None:
                    t0 = time.perf_counter()
                    cerr = rel_err(compiled.encoder(mel), ref)
                    variants["liteasr fused+compile+graph"] = graphed(lambda x: compiled.encoder(x), mel)
                    print(f"compiled in {time.perf_counter() - t0:.0f} s, rel err vs eager {cerr:.2e}", flush=True)
                if name == "dense":
                    hf_err = rel_err(hf(mel).last_hidden_state, ref)
                    variants["transformers eager"] = lambda: hf(mel)
                    variants["transformers graph"] = graphed(lambda x: hf(x), mel)
                    print(f"transformers vs liteasr dense rel err {hf_err:.2e}")
                for vname, fn in variants.items():
                    ms = timeit(fn)
                    tflops = flops * b / ms / 1e9
                    rows.append({"config": name, "batch": b, "variant": vname, "ms": ms, "tflops": tflops,
                                 "ceiling_pct": 100 * tflops / ceiling, "fused_rel_err": err,
                                 "gflop_per_window": flops / 1e9})
                    print(f"{name:10s} b={b:2d} {vname:22s} {ms:8.2f} ms {tflops:6.0f} TFLOP/s "
                          f"({100 * tflops / ceiling:4.1f} %)  fused err {err:.1e}", flush=True)
            del mel
        del model, fast, compiled
        torch.cuda.empty_cache()
    # speed-up table
    def get(c, b, v):
        return next((r["ms"] for r in rows if r["config"] == c and r["batch"] == b and r["variant"] == v), None)
    print("\n| config | batch | best liteasr ms | vs liteasr dense (best) | vs transformers eager | vs transformers graph |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, _ in configs:
        for b in args.batch_size:
            best = min(r["ms"] for r in rows if r["config"] == name and r["batch"] == b and r["variant"].startswith("liteasr"))
            dense_best = min(r["ms"] for r in rows if r["config"] == "dense" and r["batch"] == b
                             and r["variant"].startswith("liteasr"))
            te, tg = get("dense", b, "transformers eager"), get("dense", b, "transformers graph")
            print(f"| {name} | {b} | {best:.2f} | {dense_best / best:.2f}x | {te / best:.2f}x | {tg / best:.2f}x |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "encoder_gpu.json"), "w") as f:
            json.dump({"ceiling_tflops": ceiling, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
