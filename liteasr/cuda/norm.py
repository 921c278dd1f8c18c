"""Residual add + LayerNorm in one pass: a Triton kernel, its wrapper, and the PyTorch reference.

An encoder layer adds a sublayer's output y to the residual stream x and normalises the sum for the next
sublayer. Unfused that is three passes over (B·T, d) activations (add; LayerNorm's statistics; LayerNorm's
output); the kernel reads x and y once and writes the new stream and its normalised copy once, with the
statistics in float32 registers (one program per row; d = 1280 fits one tile).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional: CUDA builds of torch ship Triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def add_layer_norm_reference(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """s = x + y and LayerNorm(s), what model.EncoderLayer computes unfused. x, y (..., d); weight, bias (d,).
    Returns (s, LayerNorm(s)), both in x's dtype (the sum rounded to it first, as the eager model does)."""
    s = x + y.to(x.dtype)
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


if HAS_TRITON:

    @triton.jit
    def _add_layer_norm_kernel(X, Y, S, H, W, B, N, eps, BLOCK: tl.constexpr, HAS_Y: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        s = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_Y:
            s += tl.load(Y + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            s = s.to(S.dtype.element_ty)  # the stream is stored rounded: normalise what is stored
            tl.store(S + row * N + cols, s, mask=mask)
            s = s.to(tl.float32)
        mean = tl.sum(s, axis=0) / N
        diff = tl.where(mask, s - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / N + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(H + row * N + cols, (diff * rstd * w + b).to(H.dtype.element_ty), mask=mask)


def add_layer_norm(x: Tensor, y: Tensor | None, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(x + y, LayerNorm(x + y)) in one pass on CUDA (Triton); y None: (x, LayerNorm(x)). x, y (..., d) contiguous
    (y may be another floating dtype, e.g. the bfloat16 of an FP8 matmul); outputs in x's dtype. Falls back to the
    reference off CUDA or without Triton."""
    if not (HAS_TRITON and x.is_cuda):
        if y is None:
            return x, F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        return add_layer_norm_reference(x, y, weight, bias, eps)
    n = x.shape[-1]
    x = x.contiguous()
    s = torch.empty_like(x) if y is not None else x
    h = torch.empty_like(x)
    rows = x.numel() // n
    block = triton.next_power_of_2(n)
    _add_layer_norm_kernel[(rows,)](x, y.contiguous() if y is not None else x, s, h, weight, bias, n, eps,
                                    BLOCK=block, HAS_Y=y is not None, num_warps=4 if block <= 2048 else 8)
    return s, h
