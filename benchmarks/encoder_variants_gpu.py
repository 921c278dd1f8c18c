"""Which encoder runtime settings are fastest on this GPU: attention kernels (SDPA flash / cuDNN / efficient),
torch.compile modes, fp16 vs bf16 — for liteasr dense and compressed encoders (large-v3 shapes, random weights),
each replayed from a CUDA graph (liteasr.cuda.runtime.EncoderRunner). One run, side by side:

    python3 benchmarks/encoder_variants_gpu.py --profiles .gpu/large-v3-rank-profiles.json --batch-size 1 8

Prints an attention-only table (one layer's SDPA core, B x 20 heads x 1500 x 64), then per variant ms and the
relative error against the eager model in the same dtype. --budget-s skips the slow max-autotune variants
when the run is past that many seconds.
"""

from __future__ import annotations

import argparse
import time

import torch

from gpu_bench import cuda_time, load_profiles, matmul_ceiling, random_model, rel_err

from liteasr.bench import encoder_flops
from liteasr.cuda.runtime import EncoderRunner, fast_encoder


def sdpa_table(batch_sizes: list[int], dtype: torch.dtype) -> dict[str, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    best = {}
    for b in batch_sizes:
        q, k, v = (torch.randn(b, 20, 1500, 64, device="cuda", dtype=dtype) for _ in range(3))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        flops = 4 * b * 20 * 1500 * 1500 * 64
        for name, be in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
            try:
                with sdpa_kernel([be]):
                    out = F.scaled_dot_product_attention(q, k, v)
                    ms = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), reps=20)
                err = rel_err(out, ref)
                print(f"sdpa {name:9s} b={b:<3d} {ms:7.3f} ms  {flops / ms / 1e9:5.0f} TFLOP/s  err {err:.1e}", flush=True)
                best.setdefault(b, {})[name] = ms
            except RuntimeError as e:
                print(f"sdpa {name:9s} b={b:<3d} unavailable: {str(e)[:120]}", flush=True)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", default=None)
    ap.add_argument("--names", nargs="+", default=["skewed-c", "uniform-c"])
    ap.add_argument("--batch-size", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--budget-s", type=float, default=400)
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True
    from torch.nn.attention import SDPBackend

    ceiling = matmul_ceiling(torch.float16)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, ceiling {ceiling:.0f} TFLOP/s", flush=True)
    sdpa = sdpa_table(args.batch_size, torch.float16)
    # cuDNN's attention where it was faster at every batch size, else PyTorch's default choice
    use_cudnn = all("cudnn" in t and t["cudnn"] < t.get("flash", 1e9) for t in sdpa.values())
    backend = [SDPBackend.CUDNN_ATTENTION] if use_cudnn else None
    print(f"attention backend chosen: {'cudnn' if use_cudnn else 'default'}", flush=True)
    profiles = load_profiles(args.profiles)
    configs = [("dense", None)] + [(n, profiles[n]) for n in args.names]
    variants = [  # (name, dtype, compile, sdpa backends)
        ("graph, flash", torch.float16, False, [SDPBackend.FLASH_ATTENTION]),
        ("graph, cudnn", torch.float16, False, [SDPBackend.CUDNN_ATTENTION]),
        ("compile+graph", torch.float16, True, backend),
        ("compile+graph bf16", torch.bfloat16, True, backend),
        ("max-autotune-no-cudagraphs+graph", torch.float16, "max-autotune-no-cudagraphs", backend),
    ]
    rows = []
    for cname, profile in configs:
        for vname, dtype, compile, backends in variants:
            if compile == "max-autotune-no-cudagraphs" and time.perf_counter() - t_start > args.budget_s:
                print(f"{cname:10s} {vname}: skipped (past the {args.budget_s:.0f} s budget)", flush=True)
                continue
            torch._dynamo.reset()  # compiled code is not guarded on the SDPA backend: start clean per variant
            model = random_model("large-v3", profile, dtype)
            flops = encoder_flops(model)
            try:
                runner = EncoderRunner(fast_encoder(model.encoder, compile=compile), backends)
                for b in args.batch_size:
                    mel = torch.randn(b, 128, 3000, device="cuda", dtype=dtype)
                    t0 = time.perf_counter()
                    out = runner(mel)
                    build = time.perf_counter() - t0
                    with torch.inference_mode():
                        err = rel_err(out, model.encoder(mel))
                    ms = cuda_time(lambda: runner(mel))
                    tf = flops * b / ms / 1e9
                    rows.append((cname, vname, b, ms))
                    print(f"{cname:10s} {vname:34s} b={b:<3d} {ms:8.2f} ms {tf:5.0f} TFLOP/s ({100 * tf / ceiling:4.1f} %)"
                          f"  err vs eager {err:.1e}  build {build:.0f} s", flush=True)
                    del mel, out
                runner.graphs.clear()
            except Exception as e:  # report and go on: one broken variant must not end the run
                print(f"{cname:10s} {vname}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            del model
            torch.cuda.empty_cache()
    print("\n| config | variant | batch | ms |\n| --- | --- | ---: | ---: |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} |")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
