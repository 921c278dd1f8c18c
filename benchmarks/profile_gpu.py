"""Where the GPU time goes: kernel time by category (torch.profiler) for the compiled liteasr encoder (dense and a
rank profile, large-v3 shapes, random weights) and for one graph-captured decoder step (large-v3-turbo shapes).

    python3 benchmarks/profile_gpu.py --profile skewed-c --batch-size 1 8

Categories by kernel name: attention (cuDNN / flash / fmha), GEMM (cuBLAS sm90 / cutlass / gemm / triton_mm),
Triton fused elementwise (other triton_*), the rest. Sums of kernel time per call, so launch gaps do not count.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from gpu_bench import bench_rules, load_profiles, random_model
from liteasr.cuda.runtime import CudaRuntime, fast_encoder


def category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("cudnn", "flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(k in n for k in ("gemm", "sm90", "cutlass", "triton_mm", "gemv", "splitk", "matmul")):
        return "gemm"
    if n.startswith("triton"):
        return "triton fused"
    return "other"


def kernel_table(fn, calls: int = 3) -> tuple[dict[str, float], int]:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    by, count = defaultdict(float), 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by[category(e.name)] += e.device_time / 1000 / calls  # ms per call
            count += 1
    return dict(by), count // calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", nargs="+", default=["skewed-c"])
    ap.add_argument("--batch-size", nargs="+", type=int, default=[1, 8])
    args = ap.parse_args()
    profiles = load_profiles()
    with torch.inference_mode():
        for name in ["dense", *args.profile]:
            model = random_model("large-v3", None if name == "dense" else profiles[name], torch.float16)
            enc = fast_encoder(model.encoder, compile=True)
            for b in args.batch_size:
                mel = torch.randn(b, 128, 3000, device="cuda", dtype=torch.float16)
                by, n = kernel_table(lambda: enc(mel))
                total = sum(by.values())
                parts = "  ".join(f"{k} {v:6.2f} ms ({100 * v / total:3.0f} %)" for k, v in sorted(by.items()))
                print(f"encoder {name:9s} b={b:<3d} kernels {total:7.2f} ms in {n} launches: {parts}", flush=True)
            del model, enc
            torch.cuda.empty_cache()
        model = random_model("large-v3-turbo", None, torch.float16)
        rt = CudaRuntime(model)
        for b in (1, 32):
            mel = torch.randn(b, 128, 3000, device="cuda", dtype=torch.float16)
            cache = rt.decoder.cache(rt.encode(mel))
            prompt = torch.tensor([[50258, 50259, 50360, 50364]] * b, device="cuda")
            logits = model.decoder(prompt, cache)[:, -1]
            rt.decoder.greedy(cache, logits, 4, bench_rules(), 8)  # captures the step graph
            st = rt.decoder.states[b]
            r = rt.decoder._rules(bench_rules(), mel.device)
            by, n = kernel_table(lambda: rt.decoder._step(cache, st, r), calls=5)  # the captured code, eagerly
            graph = rt.decoder.graphs[(b, bench_rules())][0]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            st.offset.fill_(10)
            start.record()
            for _ in range(20):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            total = sum(by.values())
            parts = "  ".join(f"{k} {v:6.3f} ms" for k, v in sorted(by.items()))
            print(f"decoder step turbo b={b:<3d} graph replay {start.elapsed_time(end) / 20:.3f} ms; kernels "
                  f"{total:.3f} ms in {n} launches: {parts}", flush=True)


if __name__ == "__main__":
    main()
