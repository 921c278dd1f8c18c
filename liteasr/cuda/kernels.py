"""Self-attention computed in the reduced dimension: a Triton kernel, its thin wrapper, and the PyTorch reference.

With factored projections q = X A_q B_q + b_q, k = X A_k B_k + b_k, v = X A_v B_v + b_v (A_* = weight1 (d, r_*),
B_* = weight2 (r_*, d)) and B_*^h the d_h columns of head h:

    scores_h = q_h k_hᵀ = Q'_h K'ᵀ + (terms with b_k, constant along the keys: softmax drops them)
        K'   = X A_k                                  (B, T, r_k), one key set for every head
        Q'_h = (X A_q)(B_q^h B_k^hᵀ) + b_q^h B_k^hᵀ    (B, T, r_k) per head
    P_h v_h = (P_h V') B_v^h + b_v^h                   (rows of P_h sum to 1), V' = X A_v (B, T, r_v)

so the core is multi-query attention with score dim r_k and value dim r_v, followed by a per-head (r_v -> d_h)
projection. Its matmuls cost less than dense attention's when r_k + r_v < 2 d_h; the exponentials cost the same.
"""

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import Attention, LowRankLinear

try:  # optional: CUDA builds of torch ship Triton; without it `lowrank_attention` falls back to the reference
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

LOG2E = 1.4426950408889634  # the kernel works in base 2: exp(x) = exp2(x * log2(e))


def lowrank_attention_reference(x_q: Tensor, x_k: Tensor, x_v: Tensor, m_qk: Tensor, bias_qk: Tensor,
                                b_v_heads: Tensor, bias_v: Tensor, n_head: int, scale: float) -> Tensor:
    """Self-attention of a layer with factored q/k/v projections, computed in the reduced dimension (PyTorch).

    Args:
        x_q: (B, T, r_q) X A_q, the queries' rank-r_q activations.
        x_k: (B, T, r_k) X A_k = K', shared by all heads.
        x_v: (B, T, r_v) X A_v = V', shared by all heads.
        m_qk: (H, r_q, r_k) B_q^h B_k^hᵀ for each head h.
        bias_qk: (H, r_k) b_q^h B_k^hᵀ (terms with the key bias are left out: softmax ignores them).
        b_v_heads: (H, r_v, d_h) B_v^h, head h's columns of B_v.
        bias_v: (d,) b_v, with d = H * d_h.
        n_head: H.
        scale: the softmax scale, d_h ** -0.5 for Whisper.

    Returns:
        (B, T, d): the attention output before out_proj, in x_q's dtype. Computed in the inputs' dtype (on GPU the
        matmuls accumulate in fp32 and SDPA's softmax runs in fp32); pass float32/float64 inputs for a
        high-precision reference.
    """
    q = torch.einsum("btr,hrk->bhtk", x_q, m_qk) + bias_qk[:, None]  # (B, H, T, r_k)
    k = x_k[:, None].expand(-1, n_head, -1, -1)  # (B, H, T, r_k): the same keys for every head
    v = x_v[:, None].expand(-1, n_head, -1, -1)  # (B, H, T, r_v)
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, H, T, r_v) = O'_h
    return torch.einsum("bhtr,hrd->bthd", o, b_v_heads).flatten(2) + bias_v  # (B, T, d)


if HAS_TRITON:

    @triton.jit
    def _attn_tile(acc, l_i, m_i, q, K, V, start_n, T, r_k, r_v, qk_scale, stride_kn, stride_vn,
                   BLOCK_N: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr, MASK_N: tl.constexpr):
        # One online-softmax step over keys start_n .. start_n + BLOCK_N; MASK_N only for the ragged last tile.
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, RK)
        offs_v = tl.arange(0, RV)
        k_mask = offs_k[None, :] < r_k  # rank padding: zero columns add nothing to Q'K'ᵀ
        v_mask = offs_v[None, :] < r_v
        if MASK_N:
            k_mask = k_mask & (offs_n[:, None] < T)
            v_mask = v_mask & (offs_n[:, None] < T)
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_k[None, :], mask=k_mask, other=0.0)  # (BLOCK_N, RK)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N) fp32 scores in log2 units
        if MASK_N:
            s = tl.where(offs_n[None, :] < T, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one real key
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max (0 on the first tile)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_v[None, :], mask=v_mask, other=0.0)  # (BLOCK_N, RV)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # P rounded to the input dtype, as in FlashAttention
        return acc, l_i, m_new

    @triton.jit
    def _lowrank_attn_fwd(Q, K, V, Out, n_rows, T, r_k, r_v, qk_scale,
                          stride_qb, stride_qm, stride_kb, stride_kn, stride_vb, stride_vn, stride_ob, stride_om,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr):
        # Out[b, m] = softmax_n(Q[b, m] . K[b, n] * scale) V[b, n] for BLOCK_M query rows of batch element b.
        # Q (B, n_rows, r_k) holds every head's queries as rows; K (B, T, r_k) and V (B, T, r_v) are shared by all
        # of them; Out (B, n_rows, r_v). Last dims contiguous. RK, RV: r_k, r_v padded to powers of two >= 16.
        b = tl.program_id(1).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, RK)
        offs_v = tl.arange(0, RV)
        m_ok = offs_m[:, None] < n_rows
        q = tl.load(Q + b * stride_qb + offs_m[:, None] * stride_qm + offs_k[None, :],
                    mask=m_ok & (offs_k[None, :] < r_k), other=0.0)  # (BLOCK_M, RK)
        K += b * stride_kb
        V += b * stride_vb
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running softmax denominator
        acc = tl.zeros([BLOCK_M, RV], tl.float32)
        t_full = T - T % BLOCK_N  # whole key tiles run without a key mask
        for start_n in range(0, t_full, BLOCK_N):
            acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, K, V, start_n, T, r_k, r_v, qk_scale, stride_kn, stride_vn,
                                       BLOCK_N, RK, RV, False)
        if t_full < T:
            acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, K, V, t_full, T, r_k, r_v, qk_scale, stride_kn, stride_vn,
                                       BLOCK_N, RK, RV, True)
        acc = acc / l_i[:, None]
        tl.store(Out + b * stride_ob + offs_m[:, None] * stride_om + offs_v[None, :], acc.to(Out.dtype.element_ty),
                 mask=m_ok & (offs_v[None, :] < r_v))


def _pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.arange needs a power of two, tl.dot at least 16


def _config(rk: int, rv: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for padded ranks. The fp32 (BLOCK_M, RV) accumulator and the
    (BLOCK_M, RK) query tile live in registers; each pipeline stage holds a K' and a V' tile in shared memory.
    Up to rank 128, BLOCK_M = 128 rows share every K'/V' tile; warps and stages are set so that sm_90 builds
    have no register spills and fit in 227 KB (Triton 3.9 AOT builds read with cuobjdump
    --dump-resource-usage). benchmarks/attention_kernel.py --sweep times the alternatives on a GPU."""
    width = max(rk, rv)
    if width <= 64:
        return 128, 64, 4, 3  # <= 209 registers, <= 64 KB
    if width <= 128:
        return 128, 64, 8, 3  # 158 registers, 128 KB
    return 64, 64, 8, 2  # 180 registers, 160 KB (128 rows fit too, at 192 KB: too close to the limit)


def _aligned(x: Tensor) -> bool:
    # Triton proves 16-byte vector loads (and so cp.async pipelining) only from ints that are multiples of 16
    # (pointers it checks itself); a rank of 100 or a fused-QKV row stride of 120 would load 2 bytes at a time.
    return x.shape[-1] % 16 == 0 and x.stride(0) % 16 == 0 and x.stride(1) % 16 == 0


def _pad_cols(x: Tensor, width: int) -> Tensor:
    # A contiguous copy of x (..., r) with zero columns up to width.
    out = x.new_zeros(*x.shape[:-1], width)
    out[..., : x.shape[-1]] = x
    return out


def _traceable(kernel):
    # torch.library.wrap_triton (torch >= 2.6) lets torch.compile trace the launch; interpreted kernels stay raw.
    wrap = getattr(torch.library, "wrap_triton", None)
    return kernel if wrap is None or os.environ.get("TRITON_INTERPRET") == "1" else wrap(kernel)


def _launch(q: Tensor, k: Tensor, v: Tensor, o: Tensor, scale: float, config: tuple | None = None) -> None:
    """o (B, n_rows, r_v) = softmax(q kᵀ * scale) v with q (B, n_rows, r_k), k (B, T, r_k), v (B, T, r_v)."""
    batch, n_rows, r_k = q.shape
    T, r_v = v.shape[1:]
    rk, rv = _pad(r_k), _pad(r_v)
    block_m, block_n, num_warps, num_stages = config or _config(rk, rv)
    # Programs over (row blocks, batch): block ids run fastest, so programs that run together read the same
    # sequence's K'/V' (a few hundred KB) from L2; within a program each K'/V' tile serves BLOCK_M rows.
    grid = (triton.cdiv(n_rows, block_m), batch)
    _traceable(_lowrank_attn_fwd)[grid](
        q, k, v, o, n_rows, T, r_k, r_v, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, RK=rk, RV=rv, num_warps=num_warps, num_stages=num_stages)


@torch.no_grad()  # forward only: the kernel has no backward, so no graph is recorded around it
def _lowrank_attention_triton(x_q: Tensor, x_k: Tensor, x_v: Tensor, m_qk: Tensor, bias_qk: Tensor,
                              b_v_heads: Tensor, bias_v: Tensor, n_head: int, scale: float,
                              config: tuple | None = None) -> Tensor:
    batch, T, r_q = x_q.shape
    H, r_v, d_h = b_v_heads.shape
    r_k = x_k.shape[-1]
    assert H == n_head and m_qk.shape == (H, r_q, r_k) and bias_qk.shape == (H, r_k) and bias_v.shape == (H * d_h,)
    assert x_k.shape == (batch, T, r_k) and x_v.shape == (batch, T, r_v), "x_q, x_k, x_v must share (B, T)"
    assert x_q.dtype in (torch.float16, torch.bfloat16), f"the kernel takes fp16 or bf16, not {x_q.dtype}"
    tensors = (x_q, x_k, x_v, m_qk, bias_qk, b_v_heads, bias_v)
    assert all(t.dtype == x_q.dtype and t.device == x_q.device for t in tensors), "one dtype and device for all"
    # Row strides are free (x_q, x_k, x_v may be column slices of one fused X @ [A_q A_k A_v] GEMM).
    assert all(x.stride(-1) == 1 for x in (x_q, x_k, x_v)), "x_q, x_k, x_v need a contiguous last dim"
    if not _aligned(x_k):  # zero columns change no score; padding lets Triton use 16-byte, pipelined loads
        x_k, m_qk, bias_qk = (_pad_cols(t, _pad(r_k)) for t in (x_k, m_qk, bias_qk))
    if not _aligned(x_v):
        x_v, b_v_heads = _pad_cols(x_v, _pad(r_v)), _pad_cols(b_v_heads.transpose(1, 2), _pad(r_v)).transpose(1, 2)
    r_k, r_v = x_k.shape[-1], x_v.shape[-1]
    # Q'_h for every head in one GEMM, rows ordered (t, h): (B*T, r_q) @ (r_q, H*r_k) -> (B, T*H, r_k).
    # Stacking heads as rows turns multi-query attention into single-head attention over T*H queries.
    q = torch.addmm(bias_qk.reshape(-1), x_q.reshape(batch * T, r_q), m_qk.transpose(0, 1).reshape(r_q, H * r_k))
    o = torch.empty(batch, T * H, r_v, device=x_q.device, dtype=x_q.dtype)  # O' rows ordered (t, h)
    _launch(q.view(batch, T * H, r_k), x_k, x_v, o, scale, config)
    # O_h = O'_h B_v^h + b_v^h: one batched GEMM over heads, then (H, B*T, d_h) -> (B, T, H*d_h).
    o = torch.baddbmm(bias_v.reshape(H, 1, d_h), o.view(batch * T, H, r_v).transpose(0, 1), b_v_heads)
    return o.transpose(0, 1).reshape(batch, T, H * d_h)


def lowrank_attention(x_q: Tensor, x_k: Tensor, x_v: Tensor, m_qk: Tensor, bias_qk: Tensor,
                      b_v_heads: Tensor, bias_v: Tensor, n_head: int, scale: float) -> Tensor:
    """`lowrank_attention_reference` through the Triton kernel: same arguments, shapes and result.

    Needs CUDA tensors in fp16 or bf16, all of one dtype, with contiguous last dims (x_q, x_k, x_v may have any
    row stride). Forward only (no autograd). Without Triton, or on CPU tensors, it warns (once per reason, by
    Python's default filter) and returns the reference's result.
    """
    reason = None
    if not HAS_TRITON:
        reason = "Triton is not installed"
    elif not x_q.is_cuda:
        reason = "the inputs are not on a CUDA device"
    if reason is not None:
        warnings.warn(f"lowrank_attention: {reason}; running the PyTorch reference instead", stacklevel=2)
        return lowrank_attention_reference(x_q, x_k, x_v, m_qk, bias_qk, b_v_heads, bias_v, n_head, scale)
    return _lowrank_attention_triton(x_q, x_k, x_v, m_qk, bias_qk, b_v_heads, bias_v, n_head, scale)


def lowrank_attention_flops(T: int, H: int, r_q: int, r_k: int, r_v: int, d_h: int) -> int:
    """Matmul FLOPs of `lowrank_attention` for one sequence of T frames: the Q' precompute, Q'K'ᵀ, PV' and the
    B_v^h projection (the down-projections X A_* are left out: the dense path with factored weights has them too)."""
    return 2 * T * H * (r_q * r_k + T * r_k + T * r_v + r_v * d_h)


def dense_attention_flops(T: int, H: int, d_h: int) -> int:
    """Matmul FLOPs of standard attention's core (Q Kᵀ and P V) for one sequence of T frames."""
    return 4 * T * T * H * d_h


def lowrank_attention_wins(r_k: int, r_v: int, d_h: int) -> bool:
    """Whether the reduced-rank kernel beats SDPA, by the measured table in
    docs/logs/gpu-attention-kernel-h200-graph.log (H200, large-v3 heads, T = 1500, CUDA-graph replay): at
    r_k = r_v = 16 / 32 it took 0.74-0.94x SDPA's time at batch 8 and 32 and tied at batch 1, at 64 / 64 it
    was 1.0-1.2x slower, at 128 / 128 1.6-1.8x slower. So: r_k + r_v <= d_h. The FLOP rule alone,
    r_k + r_v < 2 d_h, is necessary but not sufficient: both paths compute the same T² H exponentials, which
    bound FlashAttention at small head dims."""
    return r_k + r_v <= d_h


def factors_from_attention(attn: Attention) -> dict:
    """The arguments of `lowrank_attention` for a liteasr `model.Attention` whose q/k/v are `LowRankLinear`.

    Returns a dict with A_q (d, r_q), A_k (d, r_k), A_v (d, r_v) (the weight1 parameters: x_* = X @ A_*),
    m_qk (H, r_q, r_k), bias_qk (H, r_k), b_v_heads (H, r_v, d_h), bias_v (d,), n_head and scale. The key bias
    is not needed. Products are formed in at least fp32 and stored in the parameters' dtype.
    """
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    assert all(isinstance(m, LowRankLinear) for m in (q, k, v)), "q_proj, k_proj and v_proj must be LowRankLinear"
    H, d = attn.n_head, q.out_features
    d_h, dtype = d // H, q.weight2.dtype
    wide = torch.promote_types(dtype, torch.float32)

    def heads(w: Tensor) -> Tensor:  # (r, d) -> (H, r, d_h)
        return w.to(wide).unflatten(1, (H, d_h)).transpose(0, 1)

    b_q, b_k = heads(q.weight2), heads(k.weight2)
    return dict(
        A_q=q.weight1, A_k=k.weight1, A_v=v.weight1,
        m_qk=(b_q @ b_k.transpose(1, 2)).to(dtype),  # (H, r_q, r_k)
        bias_qk=(q.bias.to(wide).view(H, 1, d_h) @ b_k.transpose(1, 2)).squeeze(1).to(dtype),  # (H, r_k)
        b_v_heads=heads(v.weight2).to(dtype).contiguous(),  # (H, r_v, d_h)
        bias_v=v.bias, n_head=H, scale=d_h ** -0.5)
