"""The runtime's fused kernels and FP8 linears (liteasr.cuda.norm, liteasr.cuda.fp8, the RuntimeOptions that use them)
against their PyTorch references and the float32 model.

Tolerances: a fast path in fp16 passes when its error against float32 is at most twice the error of the same
computation done by PyTorch in fp16 (flash-attention's rule), plus a floor of 1e-4 for near-exact cases. FP8 is
not held to that rule (E4M3 rounds each operand to 3 mantissa bits, ~10x fp16's error); its kernels are held to
their float32 statement of the same arithmetic (fp8_matmul_reference) up to the output dtype's rounding."""

from __future__ import annotations

import pytest
import torch

from liteasr.cuda.fp8 import (Fp8Linear, Fp8LowRankLinear, fp8_matmul_reference, gelu_quantize_rows,
                              gelu_quantize_rows_reference, quantize_rows, quantize_rows_reference)
from liteasr.cuda.norm import add_layer_norm, add_layer_norm_reference
from liteasr.cuda.runtime import CudaRuntime, EncoderRunner, RuntimeOptions, fast_encoder
from liteasr.model import Dims, LowRankLinear, Whisper

DIMS = Dims(num_mel_bins=80, vocab_size=51864, d_model=384, encoder_layers=2, encoder_attention_heads=6,
            encoder_ffn_dim=1536, decoder_layers=2, decoder_attention_heads=6, decoder_ffn_dim=1536)
RANKS = [{"q_proj": 64, "k_proj": 48, "v_proj": 96, "fc1": 128, "fc2": 96}, {"out_proj": 64, "fc1": 160}]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def random_model(ranks=None, device="cpu", seed=0) -> Whisper:
    torch.manual_seed(seed)
    model = Whisper(DIMS, ranks).to(device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "weight1" in name:
                p.normal_(0, p.shape[0] ** -0.5)
            elif "weight2" in name:
                p.normal_(0, p.shape[0] ** -0.5)
            elif "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            elif p.dim() == 1:
                p.normal_(0, 0.02)
    return model


def _cpu_rowwise_fp8() -> bool:
    """Whether this torch's CPU _scaled_mm takes per-row scales (torch >= 2.13; 2.11's oneDNN path is per-tensor)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.T, scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
        return True
    except RuntimeError:
        return False


needs_cpu_fp8 = pytest.mark.skipif(not _cpu_rowwise_fp8(), reason="this torch's CPU _scaled_mm has no row-wise scales")


def test_runtime_options_validate():
    with pytest.raises(ValueError, match="fused_norm and compile"):
        RuntimeOptions(fused_norm=True, compile=True)
    with pytest.raises(ValueError, match="fp8"):
        RuntimeOptions(fp8="int4")


@needs_cpu_fp8
@pytest.mark.parametrize("ranks", [None, RANKS], ids=["dense", "factored"])
def test_fast_encoder_variants_cpu(ranks):
    """On the CPU the fused-norm encoder (reference fallback) and the GELU-epilogue module compute the reference's
    function in float32; FP8 (the CPU's _scaled_mm) stays within E4M3's expected few per cent."""
    model = random_model(ranks)
    mel = torch.randn(2, DIMS.num_mel_bins, 3000)
    with torch.inference_mode():
        ref = model.encoder(mel)
        for kw in (dict(gelu_epilogue=True), dict(fused_norm=True), dict(fused_norm=True, gelu_epilogue=True)):
            # tanh-GELU vs erf-GELU differ by < 4e-4 absolute: far under 1e-3 relative at the encoder output
            assert rel(fast_encoder(model.encoder, **kw)(mel), ref) < 1e-3, kw
        for fp8 in ("dense", "all"):
            err = rel(fast_encoder(model.encoder, fp8=fp8)(mel), ref)
            assert 1e-4 < err < 0.1, (fp8, err)  # rounded (not silently skipped), but not broken


@needs_cpu_fp8
def test_fp8_linear_matches_its_reference_cpu():
    torch.manual_seed(1)
    lin = torch.nn.Linear(256, 384)
    x = torch.randn(50, 256)
    f = Fp8Linear(lin.weight, lin.bias, torch.bfloat16)
    ref = fp8_matmul_reference(x, lin.weight) + lin.bias
    assert rel(f(x), ref) < 2 * 2 ** -8  # bfloat16 output rounding (unit roundoff 2^-9), twice
    assert 0.005 < rel(f(x), lin(x)) < 0.06  # E4M3's 3 mantissa bits: a few per cent, never exact
    low = LowRankLinear.from_factors(torch.randn(256, 64) / 16, torch.randn(64, 384) / 8, torch.randn(384) * 0.02)
    assert rel(Fp8LowRankLinear(low, torch.bfloat16)(x), low(x)) < 0.08
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear(torch.randn(20, 32), None)


# ---------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.requires_cuda
@pytest.mark.parametrize("with_y", [True, False])
def test_add_layer_norm_cuda(with_y):
    torch.manual_seed(2)
    x = torch.randn(3, 1500, 1280, device="cuda")
    y = torch.randn(3, 1500, 1280, device="cuda") * 0.5
    w, b = torch.randn(1280, device="cuda") * 0.1 + 1, torch.randn(1280, device="cuda") * 0.1
    exact_s, exact_h = add_layer_norm_reference(x.double(), y.double() if with_y else torch.zeros_like(x).double(),
                                                w.double(), b.double())
    x16, y16 = x.half(), y.half()
    ref_s, ref_h = add_layer_norm_reference(x16, y16 if with_y else torch.zeros_like(x16), w.half(), b.half())
    s, h = add_layer_norm(x16, y16 if with_y else None, w.half(), b.half())
    assert torch.isfinite(h).all() and torch.isfinite(s).all()
    assert rel(s, exact_s) <= 2 * rel(ref_s, exact_s) + 1e-4
    assert rel(h, exact_h) <= 2 * rel(ref_h, exact_h) + 1e-4
    # a bfloat16 sublayer output (what an FP8 matmul writes) is read as such
    s2, _ = add_layer_norm(x16, y.bfloat16(), w.half(), b.half())
    assert rel(s2, exact_s if with_y else s2) < 5e-3


@pytest.mark.requires_cuda
def test_quantize_rows_cuda():
    torch.manual_seed(3)
    x = torch.randn(1500, 2048, device="cuda", dtype=torch.float16) * torch.rand(1500, 1, device="cuda", dtype=torch.float16) * 5
    for view in (x, x[:, 256:1536]):  # whole rows and a column slice (the fused q/k/v split)
        q, s = quantize_rows(view)
        rq, rs = quantize_rows_reference(view)
        torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
        diff = (q.float() - rq.float()).abs()
        # same scale, same rounding mode; the division may differ in its last bit, flipping a rare tie by one step
        step = rq.float().abs().clamp(min=2 ** -6) * 2 ** -3
        assert (diff <= step).all() and (diff > 0).float().mean() < 1e-3


@pytest.mark.requires_cuda
def test_gelu_quantize_rows_cuda():
    torch.manual_seed(5)
    y = torch.randn(3000, 5120, device="cuda", dtype=torch.float16) * 2
    bias = torch.randn(5120, device="cuda", dtype=torch.float16) * 0.1
    q, s = gelu_quantize_rows(y, bias)
    rq, rs = gelu_quantize_rows_reference(y, bias)
    torch.testing.assert_close(s, rs, rtol=2e-3, atol=0)  # fp32 erf vs PyTorch's: the row max moves in the last bits
    deq, rdeq = q.float() * s, rq.float() * rs
    assert rel(deq, rdeq) < 2 ** -5  # a tie flipped here and there by one E4M3 step; most elements identical


@pytest.mark.requires_cuda
@pytest.mark.parametrize("m,k,n", [(1500, 1280, 1280), (3000, 1280, 208), (1500, 336, 5120)])
def test_fp8_linear_cuda(m, k, n):
    torch.manual_seed(4)
    w = torch.randn(n, k, device="cuda") * k ** -0.5
    bias = torch.randn(n, device="cuda") * 0.02
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    f = Fp8Linear(w.half(), bias.half())
    y = f(x)
    assert y.dtype == torch.float16 and y.shape == (m, n)
    ref = fp8_matmul_reference(x.float(), w.half().float()) + bias.half().float()
    assert rel(y, ref) < 2 * 2 ** -8  # the output's rounding (bfloat16 at worst), twice
    assert rel(y, x.float() @ w.half().float().T + bias.half().float()) < 0.06


def _encoder_errors(ranks, **options):
    model32 = random_model(ranks, "cuda")
    model16 = random_model(ranks, "cuda").half()
    mel = torch.randn(2, DIMS.num_mel_bins, 3000, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.inference_mode():
        exact = model32.encoder(mel)
        ref_err = rel(model16.encoder(mel.half()), exact)
        got = EncoderRunner(fast_encoder(model16.encoder, **options))(mel.half())
        return rel(got, exact), ref_err


@pytest.mark.requires_cuda
@pytest.mark.parametrize("ranks", [None, RANKS], ids=["dense", "factored"])
@pytest.mark.parametrize("options", [dict(gelu_epilogue=True), dict(fused_norm=True),
                                     dict(fused_norm=True, gelu_epilogue=True),
                                     dict(compile=True, gelu_epilogue=True)], ids=str)
def test_fused_encoder_cuda(ranks, options):
    err, ref_err = _encoder_errors(ranks, **options)
    print(f"{options}: err {err:.2e} vs fp16 reference {ref_err:.2e}")
    assert err <= 2 * ref_err + 1e-4


@pytest.mark.requires_cuda
@pytest.mark.parametrize("ranks", [None, RANKS], ids=["dense", "factored"])
@pytest.mark.parametrize("options", [dict(fp8="dense", fused_norm=True), dict(fp8="all", fused_norm=True),
                                     dict(fp8="all", compile=True)], ids=str)
def test_fp8_encoder_cuda(ranks, options):
    """FP8: a few per cent against float32 (E4M3), reported next to fp16's; the accuracy gate that matters is the
    real-weight WER (docs/performance.md)."""
    err, ref_err = _encoder_errors(ranks, **options)
    print(f"{options}: err {err:.2e} vs fp16 reference {ref_err:.2e}")
    assert err < 0.1


@pytest.mark.requires_cuda
def test_compiled_decoder_step_equals_reference_cuda():
    """float32, TF32 off: the compiled-then-captured step picks the reference's tokens."""
    from liteasr.decoding import DecodingOptions
    from liteasr.decoding import decode as decode_reference
    from liteasr.tokenizer import Tokenizer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = random_model(RANKS, "cuda")
    with torch.no_grad():
        model.decoder.embed_tokens.weight.normal_(0, 1)  # peaky logits: no near-ties for rounding to flip
    import os

    tok_dir = os.environ.get("LITEASR_TEST_TOKENIZER_DIR")
    if not tok_dir:
        from liteasr.fetch import fetch_model

        try:
            tok_dir = fetch_model("tiny.en", quiet=True)
        except (OSError, RuntimeError) as e:
            pytest.skip(f"tiny.en's tokenizer is neither cached nor fetchable ({type(e).__name__}); set "
                        "LITEASR_TEST_TOKENIZER_DIR")
    model.tokenizer = Tokenizer.from_dir(tok_dir)
    options = DecodingOptions(max_new_tokens=40)
    rt = CudaRuntime(model, RuntimeOptions(compile_decoder=True))
    mel = torch.randn(2, DIMS.num_mel_bins, 3000, device="cuda")
    got = rt.decode_fast(mel, options)
    ref = decode_reference(model, mel, options)
    assert [r.tokens for r in got] == [r.tokens for r in ref]
