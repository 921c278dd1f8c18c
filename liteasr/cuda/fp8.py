"""FP8 (E4M3) linear layers for Hopper: weights quantized once per output channel, activations per token at each
call, the product through `torch._scaled_mm` (cuBLASLt's FP8 GEMM, float32 accumulation, both scales applied in
its epilogue).

E4M3 keeps 3 mantissa bits: each operand element is within 2^-4 (6.25 %) of its value, relative, and a K-long dot
product of such errors averages down to about 2^-4 / sqrt(3) / sqrt(K) of its magnitude's spread — an
encoder output error of a few 1e-2 against float32, where float16 has a few 1e-3. Whether that costs words is
measured (WER on real weights), not assumed: see docs/performance.md.

`Fp8Linear` wraps a dense (out, in) weight; `fp8_linear(module)` turns an nn.Linear or a factored LowRankLinear
(two FP8 matmuls) into its FP8 twin. `fp8_matmul_reference` states the same arithmetic in float32 for tests.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..model import LowRankLinear

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite E4M3 value


try:  # optional: CUDA builds of torch ship Triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def quantize_rows_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric E4M3 quantization: x (M, K) -> (x8 (M, K) float8_e4m3fn, scale (M, 1) float32) with
    x ≈ x8 · scale; each row's largest magnitude maps to 448. Under torch.compile the amax, division and cast fuse
    into one pass (with whatever produced x)."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(E4M3), scale


if HAS_TRITON:

    @triton.jit
    def _quantize_rows_kernel(X, Q, S, K, stride_x, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
        tl.store(S + row, scale)
        tl.store(Q + row * K + cols, (x / scale).to(Q.dtype.element_ty), mask=cols < K)


if HAS_TRITON:

    @triton.jit
    def _gelu_quantize_rows_kernel(Y, BIAS, Q, S, K, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        y = tl.load(Y + row * K + cols, mask=mask, other=0.0).to(tl.float32)
        y += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
        g = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))  # exact (erf) GELU, as Whisper's
        g = g.to(Y.dtype.element_ty).to(tl.float32)  # the activation the unfused path would hand fc2
        g = tl.where(mask, g, 0.0)
        scale = tl.maximum(tl.max(tl.abs(g), axis=0), 1e-12) / 448.0
        tl.store(S + row, scale)
        tl.store(Q + row * K + cols, (g / scale).to(Q.dtype.element_ty), mask=mask)


def gelu_quantize_rows_reference(y: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """quantize_rows(GELU(y + bias)): fc1's bias and activation and fc2's input quantization. y (M, K), bias (K,)."""
    return quantize_rows_reference(torch.nn.functional.gelu(y + bias))


def gelu_quantize_rows(y: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """gelu_quantize_rows_reference in one pass on CUDA (Triton: y read once, the E4M3 activation written once
    instead of bias, GELU and quantization passes over the (B·T, 5120) tensor); the reference elsewhere."""
    if not (HAS_TRITON and y.is_cuda and y.is_contiguous()) or torch.compiler.is_compiling():
        return gelu_quantize_rows_reference(y, bias)
    m, k = y.shape
    q = torch.empty(m, k, device=y.device, dtype=E4M3)
    s = torch.empty(m, 1, device=y.device, dtype=torch.float32)
    _gelu_quantize_rows_kernel[(m,)](y, bias, q, s, k, BLOCK=triton.next_power_of_2(k), num_warps=8)
    return q, s


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """quantize_rows_reference in one pass on CUDA (Triton: each row read once, its E4M3 copy written once); the
    reference elsewhere and while torch.compile traces (Inductor fuses the reference's ops itself). x (M, K) with
    unit stride along K (column slices of a wider matrix are fine)."""
    if not (HAS_TRITON and x.is_cuda and x.stride(-1) == 1) or torch.compiler.is_compiling():
        return quantize_rows_reference(x)
    m, k = x.shape
    q = torch.empty(m, k, device=x.device, dtype=E4M3)
    s = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return q, s


def fp8_matmul_reference(x: Tensor, weight: Tensor) -> Tensor:
    """What Fp8Linear computes (without bias), in float32: both operands rounded to E4M3 per row / per output
    channel, then multiplied exactly. x (M, K), weight (N, K) -> (M, N) float32."""
    x8, sx = quantize_rows_reference(x)
    w8, sw = quantize_rows_reference(weight)
    return (x8.float() * sx) @ (w8.float() * sw).T


def fp8_out_dtype(device: torch.device, want: torch.dtype) -> torch.dtype:
    """`want` if _scaled_mm with per-row scales can write it on this device, else bfloat16 (some cuBLASLt/PyTorch
    builds support row-wise scaling with a bfloat16 output only). One tiny probe call."""
    a = torch.ones(16, 32, device=device).to(E4M3)
    b = torch.ones(16, 32, device=device).to(E4M3)
    try:
        torch._scaled_mm(a, b.T, scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 16, device=device),
                         out_dtype=want)
        return want
    except RuntimeError:
        return torch.bfloat16


class Fp8Linear(nn.Module):
    """y = x Wᵀ + b with W in E4M3 (one float32 scale per output channel) and x quantized per token (row) at each
    call. x (..., in) -> (..., out) in x's dtype. K = in and N = out must be multiples of 16 (cuBLASLt's FP8 rule)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        n, k = weight.shape
        if n % 16 or k % 16:
            raise ValueError(f"Fp8Linear: in and out features must be multiples of 16, got ({n}, {k})")
        w8, sw = quantize_rows_reference(weight.detach().contiguous())  # (out, in) row-major: what _scaled_mm needs
        self.register_buffer("weight8", w8)  # (out, in) row-major = the column-major (in, out) _scaled_mm takes
        self.register_buffer("weight_scale", sw.T.contiguous())  # (1, out)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.out_features, self.in_features = n, k
        self.out_dtype = out_dtype or weight.dtype

    def mm(self, x8: Tensor, sx: Tensor, bias: bool = True) -> Tensor:
        """The GEMM on already quantized rows: x8 (M, in) E4M3, sx (M, 1) -> (M, out) in out_dtype, with the bias
        in the epilogue when `bias` and the output dtype matches it (else the caller adds it)."""
        b = self.bias if bias and self.bias is not None and self.bias.dtype == self.out_dtype else None
        return torch._scaled_mm(x8, self.weight8.T, scale_a=sx, scale_b=self.weight_scale, bias=b,
                                out_dtype=self.out_dtype)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = self.mm(*quantize_rows(x2))
        if self.bias is not None and self.bias.dtype != self.out_dtype:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class Fp8Mlp(nn.Module):
    """fc2(GELU(fc1(x))) for dense fc1, fc2 in FP8, in three launches: fc1's GEMM (no bias), one Triton pass that adds
    fc1's bias, applies GELU and quantizes the rows for fc2 (gelu_quantize_rows), fc2's GEMM with its bias in the
    epilogue. x (..., d) -> (..., d)."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.fc1 = Fp8Linear(fc1.weight, fc1.bias, out_dtype)
        self.fc2 = Fp8Linear(fc2.weight, fc2.bias, out_dtype)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.fc1.in_features)
        y = self.fc1.mm(*quantize_rows(x2), bias=False)  # (M, ffn)
        y = self.fc2.mm(*gelu_quantize_rows(y, self.fc1.bias))
        if self.fc2.bias.dtype != self.fc2.out_dtype:
            y = y + self.fc2.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.fc2.out_features)


class Fp8LowRankLinear(nn.Module):
    """A factored linear (x A) B + b as two FP8 matmuls; the rank-r intermediate is quantized per row too."""

    def __init__(self, layer: LowRankLinear, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.down = Fp8Linear(layer.weight1.T, None, out_dtype)
        self.up = Fp8Linear(layer.weight2.T, layer.bias, out_dtype)
        self.rank = layer.rank

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


def fp8_linear(module: nn.Module, factored: bool = True, out_dtype: torch.dtype | None = None) -> nn.Module:
    """The FP8 twin of an nn.Linear (Fp8Linear) or, when `factored`, of a LowRankLinear (Fp8LowRankLinear); other
    modules, and factored ones when not `factored`, are returned unchanged (shared, not copied)."""
    if isinstance(module, nn.Linear):
        return Fp8Linear(module.weight, module.bias, out_dtype)
    if isinstance(module, LowRankLinear) and factored:
        return Fp8LowRankLinear(module, out_dtype)
    return module
