"""Encoder cost of the models a user has: latency per 30-s window (warm-up, synchronisation, median of N)
and FLOPs. The GPU comparison harness with its baselines lives in benchmarks/gpu_bench.py."""

from __future__ import annotations

import statistics
import time

import torch



@torch.inference_mode()
def encoder_latency(model, batch_size: int = 1, repeats: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of one encoder call on `batch_size` random 30-s mel windows, for a liteasr Whisper
    (its eager encoder) or a liteasr.cuda.CudaRuntime (its fast encoder, graphs captured during warm-up).

    Random features, not zeros: zeros can run faster than real data on some kernels. On CUDA the
    device is synchronised around each call, so the host clock measures the device work."""
    whisper = getattr(model, "model", model)
    p = next(whisper.parameters())
    mel = torch.randn(batch_size, whisper.dims.num_mel_bins, 3000, generator=torch.Generator().manual_seed(0))
    mel = mel.to(p.device, p.dtype)
    encode = getattr(model, "encode", None) or whisper.encoder
    sync = torch.cuda.synchronize if p.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        encode(mel)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        encode(mel)
        sync()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def encoder_flops(model, frames: int = 1500) -> int:
    """FLOPs of one encoder window: conv stem, linear layers (factored ones at their rank), attention core."""
    from .model import LowRankLinear, encoder_linears

    d, n_mels = model.dims.d_model, model.dims.num_mel_bins
    conv = 2 * (2 * frames) * n_mels * d * 3 + 2 * frames * d * d * 3
    linear = 0
    for m in encoder_linears(model).values():
        linear += 2 * frames * (m.rank * (m.in_features + m.out_features) if isinstance(m, LowRankLinear)
                                else m.in_features * m.out_features)
    attention = len(model.encoder.layers) * 2 * 2 * frames * frames * d  # QKᵀ and P·V
    return conv + linear + attention
