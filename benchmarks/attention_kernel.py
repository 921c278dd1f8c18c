"""Attention in the reduced dimension (liteasr.cuda.kernels) against SDPA on dense q/k/v, on one CUDA GPU.

Whisper large-v3 encoder self-attention (d = 1280, H = 20, d_h = 64, T = 1500) with factored q/k/v at
r_q = r_k = r_v = r. For each rank and batch: a correctness check against the float64 reference first, then the
median time (triton.testing.do_bench) of
  sdpa       SDPA, flash backend, on dense q/k/v (B, H, T, d_h): the attention core alone;
  dense      what model.Attention does after the down-projections X A_*: the up-projections x_* B_* + b_*, the
             head split, SDPA (default backend) and the head merge;
  lowrank    liteasr.cuda.kernels.lowrank_attention: the Q' GEMM, the Triton kernel and the B_v^h projection, which
             together replace `dense`;
  core       the Triton kernel alone, O' = softmax(Q' K'ᵀ) V';
  reference  lowrank_attention_reference in the same dtype.
--sweep also times the kernel core under other tile configurations (batch 8). Prints tables; writes
attention_kernel_<dtype>[_cudagraph].json to $OUT when OUT is set. Exits 1 if a correctness check fails.

    python3 benchmarks/attention_kernel.py [--dtype fp16|bf16] [--batch 1 8 32] [--ranks 16 32 64 128]
                                           [--sweep] [--cudagraph]
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from liteasr.cuda import kernels  # noqa: E402
from liteasr.model import Attention  # noqa: E402

D, H, T = 1280, 20, 1500
D_H = D // H
DEVICE = "cuda"
SWEEP = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 4, 3),
         (64, 32, 4, 3), (64, 64, 8, 2)]


def make_layer(rank: int, dtype: torch.dtype) -> Attention:
    """A large-v3 attention layer with random factored q/k/v (unit-variance activations, nonzero biases)."""
    attn = Attention(D, H, {"q_proj": rank, "k_proj": rank, "v_proj": rank})
    with torch.no_grad():
        for m in (attn.q_proj, attn.k_proj, attn.v_proj):
            m.weight1.normal_(0, D ** -0.5)
            m.weight2.normal_(0, rank ** -0.5)
            m.bias.normal_(0, 0.5)
    return attn.to(DEVICE, dtype)


def inputs(attn: Attention, batch: int) -> dict:
    f = kernels.factors_from_attention(attn)
    x = torch.randn(batch, T, D, device=DEVICE, dtype=attn.q_proj.weight1.dtype)  # LayerNorm output
    xqkv = x @ torch.cat([f["A_q"], f["A_k"], f["A_v"]], 1)  # one GEMM for the three down-projections
    x_q, x_k, x_v = (t.contiguous() for t in xqkv.chunk(3, dim=-1))
    args = [x_q, x_k, x_v] + [f[k] for k in ("m_qk", "bias_qk", "b_v_heads", "bias_v", "n_head", "scale")]
    return dict(args=args, attn=attn)


def dense_qkv(attn: Attention, x_q, x_k, x_v) -> list:
    """The up-projections x_* B_* + b_* of LowRankLinear: (B, T, r) -> (B, T, d)."""
    return [torch.addmm(m.bias, x.flatten(0, 1), m.weight2).view(*x.shape[:2], D)
            for m, x in ((attn.q_proj, x_q), (attn.k_proj, x_k), (attn.v_proj, x_v))]


def dense_path(attn: Attention, x_q, x_k, x_v):
    """model.Attention after the down-projections: up-project, split heads, SDPA, merge heads."""
    q, k, v = dense_qkv(attn, x_q, x_k, x_v)
    o = F.scaled_dot_product_attention(attn.heads(q), attn.heads(k), attn.heads(v))
    return o.transpose(1, 2).flatten(2)


@torch.no_grad()
def check(case: dict, dtype: torch.dtype) -> dict:
    """Max errors against the float64 reference on the first two sequences; the flash-attn rule decides."""
    args = [x[:2] for x in case["args"][:3]] + case["args"][3:]  # x_q, x_k, x_v of two sequences
    exact = kernels.lowrank_attention_reference(*[a.double() if torch.is_tensor(a) else a for a in args])
    floor = 1e-5  # as in tests/test_kernels.py: only for errors that are ~0 in both paths
    err = lambda out: (out.double() - exact).abs().max().item()  # noqa: E731
    res = dict(kernel=err(kernels.lowrank_attention(*args)), torch=err(kernels.lowrank_attention_reference(*args)),
               dense=err(dense_path(case["attn"], *args[:3])))
    res["ok"] = res["kernel"] <= 2 * res["torch"] + floor
    return res


CUDA_GRAPH = False  # --cudagraph: replay each call from a CUDA graph, so launch overhead does not count


def bench(fn) -> float:
    """Median ms of fn; NaN (with the error printed) when it cannot run, so one failure keeps the table."""
    try:
        if CUDA_GRAPH:
            fn()  # compile (Triton) and allocate outside the capture
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    except Exception as e:  # e.g. out of shared memory for a swept tile, or a capture that fails
        print(f"  [{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}]", flush=True)
        return float("nan")


@torch.no_grad()
def time_case(case: dict) -> dict:
    args, attn = case["args"], case["attn"]
    x_q, x_k, x_v = args[:3]
    batch, r = x_q.shape[0], x_q.shape[-1]
    q, k, v = (attn.heads(h).contiguous() for h in dense_qkv(attn, x_q, x_k, x_v))  # (B, H, T, d_h)
    q_prime = torch.randn(batch, T * H, r, device=DEVICE, dtype=x_q.dtype)  # the kernel's inputs and output
    o_prime = torch.empty(batch, T * H, r, device=DEVICE, dtype=x_q.dtype)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    return dict(sdpa=sdpa, dense=bench(lambda: dense_path(attn, x_q, x_k, x_v)),
                lowrank=bench(lambda: kernels.lowrank_attention(*args)),
                core=bench(lambda: kernels._launch(q_prime, x_k, x_v, o_prime, D_H ** -0.5)),
                reference=bench(lambda: kernels.lowrank_attention_reference(*args)))


def sweep(case: dict) -> dict:
    x_q, x_k, x_v = case["args"][:3]
    batch, r = x_q.shape[0], x_q.shape[-1]
    q_prime = torch.randn(batch, T * H, r, device=DEVICE, dtype=x_q.dtype)
    o_prime = torch.empty(batch, T * H, r, device=DEVICE, dtype=x_q.dtype)
    return {str(c): bench(lambda c=c: kernels._launch(q_prime, x_k, x_v, o_prime, D_H ** -0.5, c)) for c in SWEEP}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--sweep", action="store_true", help="time the kernel core under other tile configurations")
    p.add_argument("--cudagraph", action="store_true", help="time CUDA-graph replays (no launch overhead)")
    a = p.parse_args()
    global CUDA_GRAPH
    CUDA_GRAPH = a.cudagraph
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  {a.dtype}"
          f"  {'CUDA-graph replay' if a.cudagraph else 'eager launches'}")
    print(f"large-v3 attention: d={D} H={H} d_h={D_H} T={T}; times in ms (median), speed-up = time / lowrank\n")
    head = ("rank", "batch", "sdpa", "dense", "lowrank", "core", "reference", "vs sdpa", "vs dense",
            "err kernel", "err torch", "check")
    print("".join(f"{h:>11}" for h in head))
    rows, sweeps, ok = [], {}, True
    for rank in a.ranks:
        attn = make_layer(rank, dtype)
        for batch in a.batch:
            case = inputs(attn, batch)
            c = check(case, dtype)
            t = time_case(case)
            ok &= c["ok"]
            rows.append(dict(rank=rank, batch=batch, **t, **{f"err_{k}": v for k, v in c.items()}))
            cells = [rank, batch] + [f"{t[k]:.3f}" for k in ("sdpa", "dense", "lowrank", "core", "reference")]
            cells += [f"{t['sdpa'] / t['lowrank']:.2f}x", f"{t['dense'] / t['lowrank']:.2f}x",
                      f"{c['kernel']:.1e}", f"{c['torch']:.1e}", "ok" if c["ok"] else "FAIL"]
            print("".join(f"{x:>11}" for x in cells), flush=True)
        if a.sweep:
            sweeps[rank] = sweep(inputs(attn, 8))
            print(f"  sweep rank {rank} batch 8 (BLOCK_M, BLOCK_N, warps, stages): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in sweeps[rank].items())
                  + f"  [default {kernels._config(kernels._pad(rank), kernels._pad(rank))}]", flush=True)
    if os.environ.get("OUT"):
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    dtype=a.dtype, cudagraph=a.cudagraph, d=D, H=H, T=T)
        name = f"attention_kernel_{a.dtype}{'_cudagraph' if a.cudagraph else ''}.json"
        with open(os.path.join(os.environ["OUT"], name), "w") as fh:
            json.dump(dict(meta=meta, rows=rows, sweep=sweeps), fh, indent=1)
    print("\nall correctness checks passed" if ok else "\nCORRECTNESS CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
