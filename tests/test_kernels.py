"""Attention in the reduced dimension (liteasr.cuda.kernels): the reference against standard attention, the Triton
kernel against the reference (flash-attn's tolerance rule), the CPU fallback and the cost model."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from liteasr.cuda.kernels import (dense_attention_flops, factors_from_attention, lowrank_attention,
                             lowrank_attention_flops, lowrank_attention_reference, lowrank_attention_wins)
from liteasr.model import Attention

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARG_NAMES = ("m_qk", "bias_qk", "b_v_heads", "bias_v", "n_head", "scale")


def lowrank_attn_module(d: int, n_head: int, r_q: int, r_k: int, r_v: int, dtype=torch.float64) -> Attention:
    """A liteasr Attention with factored q/k/v: random factors and random biases, the key bias included."""
    attn = Attention(d, n_head, {"q_proj": r_q, "k_proj": r_k, "v_proj": r_v}).to(dtype)
    with torch.no_grad():
        for m in (attn.q_proj, attn.k_proj, attn.v_proj):
            m.weight1.normal_(0, d ** -0.5)  # unit-variance activations
            m.weight2.normal_(0, m.rank ** -0.5)
            m.bias.normal_(0, 1.0)  # a nonzero k bias: only softmax invariance makes the reference exact
    return attn


def kernel_args(f: dict, x: torch.Tensor) -> list:
    """lowrank_attention's arguments for LayerNorm output x (B, T, d) and factors f."""
    return [x @ f["A_q"], x @ f["A_k"], x @ f["A_v"]] + [f[k] for k in ARG_NAMES]


RANKS = [(16, 16, 16), (32, 48, 80), (100, 32, 48), (80, 100, 100)]  # (r_q, r_k, r_v), mostly not multiples of 16
# tiny (6 x 64) and large-v3 (20 x 64) at T = 37 for every rank triple, and at T = 1500 for a few (float64 on
# 2 CPU cores takes seconds there).
REFERENCE_CASES = ([(h, 64, 37, r) for h in (6, 20) for r in RANKS]
                   + [(6, 64, 1500, RANKS[1]), (6, 64, 1500, RANKS[3]), (20, 64, 1500, RANKS[2])])


@pytest.mark.parametrize("n_head,d_h,T,ranks", REFERENCE_CASES,
                         ids=[f"H{h}-T{t}-r{'-'.join(map(str, r))}" for h, _, t, r in REFERENCE_CASES])
def test_reference_equals_standard_attention(n_head, d_h, T, ranks):
    """The factored scores and outputs are an exact rewrite: in float64 they match the module's SDPA path to
    rounding, including ranks that are not multiples of 16."""
    attn = lowrank_attn_module(n_head * d_h, n_head, *ranks)
    x = torch.randn(2 if T < 100 else 1, T, n_head * d_h, dtype=torch.float64)
    f = factors_from_attention(attn)
    with torch.no_grad():
        expected = attn(x)  # standard attention on dense q/k/v, then out_proj
        got = attn.out_proj(lowrank_attention_reference(*kernel_args(f, x)))
    err = (got - expected).abs()
    print(f"max {err.max().item():.2e} mean {err.mean().item():.2e}")
    assert err.max().item() < 1e-10 * max(1.0, expected.abs().max().item())


def test_factors_shapes():
    attn = lowrank_attn_module(384, 6, 20, 24, 40, torch.float32)
    f = factors_from_attention(attn)
    assert f["m_qk"].shape == (6, 20, 24) and f["bias_qk"].shape == (6, 24)
    assert f["b_v_heads"].shape == (6, 40, 64) and f["bias_v"].shape == (384,)
    assert f["n_head"] == 6 and f["scale"] == 64 ** -0.5 and f["m_qk"].dtype == torch.float32


def test_fallback_warns_and_returns_reference():
    attn = lowrank_attn_module(384, 6, 16, 24, 32, torch.float32)
    args = kernel_args(factors_from_attention(attn), torch.randn(2, 37, 384))
    with torch.no_grad(), pytest.warns(UserWarning, match="PyTorch reference"):
        out = lowrank_attention(*args)
    assert torch.equal(out, lowrank_attention_reference(*args))


def test_cost_model():
    T, H, d_h = 1500, 20, 64
    assert lowrank_attention_flops(T, H, 16, 16, 16, d_h) < dense_attention_flops(T, H, d_h) / 3
    # At r = d_h the low-rank path does the dense core's work plus the Q' and B_v projections.
    assert lowrank_attention_flops(T, H, d_h, d_h, d_h, d_h) > dense_attention_flops(T, H, d_h)
    # The rule the runtime uses is stricter than the FLOP rule r_k + r_v < 2 d_h (measured: both paths compute
    # the same T² H exponentials): it must never choose the kernel where the FLOP rule says it cannot win.
    for r_k, r_v in [(16, 16), (32, 32), (16, 48), (64, 64), (100, 27), (128, 128)]:
        if lowrank_attention_wins(r_k, r_v, d_h):
            assert lowrank_attention_flops(T, H, 256, r_k, r_v, d_h) < dense_attention_flops(T, H, d_h)
    assert lowrank_attention_wins(32, 32, d_h) and not lowrank_attention_wins(64, 64, d_h)


# ---------------------------------------------------------------------------------------------------
# the Triton kernel


def random_args(batch, T, n_head, d_h, r_q, r_k, r_v, device) -> list:
    """Kernel arguments in float32 with unit-scale activations; scores have std ~ sqrt(r_k) / 8."""
    g = lambda *shape, s=1.0: torch.randn(*shape, device=device) * s  # noqa: E731
    return [g(batch, T, r_q), g(batch, T, r_k), g(batch, T, r_v), g(n_head, r_q, r_k, s=r_q ** -0.5),
            g(n_head, r_k), g(n_head, r_v, d_h, s=r_v ** -0.5), g(n_head * d_h), n_head, d_h ** -0.5]


def check_against_reference(run, args: list, dtype: torch.dtype) -> None:
    """flash-attn's rule: the kernel's error (in dtype) against a float64 reference on the same dtype-rounded
    inputs is at most twice the error of the PyTorch reference run in dtype. Both paths round Q', P and O' to
    dtype, so their errors are of one size; the small absolute floor only covers errors that are ~0 in both."""
    low = [a.to(dtype) if torch.is_tensor(a) else a for a in args]
    exact = lowrank_attention_reference(*[a.double() if torch.is_tensor(a) else a for a in low])
    out = run(*low).double()
    ref = lowrank_attention_reference(*low).double()
    err, ref_err = (out - exact).abs(), (ref - exact).abs()
    floor = 1e-5
    print(f"kernel max {err.max().item():.3e} mean {err.mean().item():.3e} | "
          f"torch {dtype} max {ref_err.max().item():.3e} mean {ref_err.mean().item():.3e} | floor {floor:.1e}")
    assert out.shape == exact.shape and torch.isfinite(out).all()
    assert err.max().item() <= 2 * ref_err.max().item() + floor
    assert err.mean().item() <= 2 * ref_err.mean().item() + floor


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1500, 37, 1])
@pytest.mark.parametrize("rank", [16, 32, 64, 100, 256])
@pytest.mark.parametrize("batch", [1, 3])
def test_kernel_matches_reference(dtype, T, rank, batch):
    args = random_args(batch, T, 20, 64, rank, rank, rank, "cuda")
    check_against_reference(lowrank_attention, args, dtype)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("ranks", [(80, 24, 100), (16, 200, 20), (256, 16, 48)])
def test_kernel_mixed_ranks(ranks):
    args = random_args(2, 1500, 20, 64, *ranks, "cuda")
    check_against_reference(lowrank_attention, args, torch.float16)


@pytest.mark.requires_cuda
@torch.no_grad()
def test_kernel_on_fused_qkv_slices():
    """x_q, x_k, x_v as fp16 column slices of one X @ [A_q A_k A_v] product (row stride r_q + r_k + r_v = 120),
    and the whole layer through out_proj against the float32 module."""
    attn = lowrank_attn_module(1280, 20, 48, 32, 40, torch.float32).cuda()
    f = {k: v.half() if torch.is_tensor(v) else v for k, v in factors_from_attention(attn).items()}
    x = torch.randn(2, 1500, 1280, device="cuda")
    xqkv = x.half() @ torch.cat([f["A_q"], f["A_k"], f["A_v"]], 1)  # (B, T, 120)
    args = list(xqkv.split([48, 32, 40], dim=-1)) + [f[k] for k in ARG_NAMES]
    assert args[1].stride(1) == 120 and args[1].dtype == torch.float16
    check_against_reference(lowrank_attention, args, torch.float16)
    expected = attn(x)  # standard attention in float32 on the dense q/k/v
    got = attn.out_proj(lowrank_attention(*args).float())
    assert (got - expected).abs().max().item() < 2e-2 * expected.abs().max().item()


# The kernel's logic on CPU through Triton's interpreter (TRITON_INTERPRET=1 must be set before Triton is
# imported, hence the subprocess). Skipped where Triton is not installed, as in CI.
INTERPRETER_SCRIPT = textwrap.dedent("""
    import torch
    from liteasr.cuda.kernels import _lowrank_attention_triton
    from tests.test_kernels import check_against_reference, random_args
    for batch, T, H, d_h, r_q, r_k, r_v, config in [
            (2, 37, 3, 16, 20, 24, 16, None),           # ragged T, padded ranks, default tile
            (1, 1, 2, 16, 16, 16, 16, None),            # a single key
            (2, 70, 3, 32, 20, 24, 40, (16, 32, 1, 1)),  # two full key tiles + a ragged one, a ragged row block
            (1, 100, 4, 64, 100, 100, 100, None)]:      # rank 100 -> 128
        torch.manual_seed(0)
        args = random_args(batch, T, H, d_h, r_q, r_k, r_v, "cpu")
        run = lambda *a: _lowrank_attention_triton(*a, config=config)
        check_against_reference(run, args, torch.float16)
    print("interpreter ok")
""")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter check is for GPU-less machines; "
                    "with a GPU the real kernel tests run (the interpreter of Triton 3.6 mis-converts a scalar)")
def test_kernel_in_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout, proc.stderr[-3000:])
    assert proc.returncode == 0 and "interpreter ok" in proc.stdout
