"""liteasr.model against transformers' Whisper on the real weights, and its own building blocks:
the factored linear, the KV-cached incremental decoder, short encoder inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from liteasr.audio import log_mel_spectrogram, pad_or_trim
from liteasr.model import LowRankLinear, dense_weight, encoder_linears, set_module

MODELS = ["tiny.en", "base"]


def _models(request, name: str):
    """(liteasr model, transformers model) for `name`, from the session fixtures."""
    if name == "tiny.en":
        return request.getfixturevalue("tiny_en"), request.getfixturevalue("hf_tiny")
    return request.getfixturevalue("base"), request.getfixturevalue("hf_base")


@pytest.fixture(scope="module")
def our_features(jfk_mel):
    """name -> liteasr encoder output on the JFK window, computed once per model (the encoder is
    the expensive part on CPU)."""
    cache: dict[str, torch.Tensor] = {}

    def get(model, name: str) -> torch.Tensor:
        if name not in cache:
            with torch.inference_mode():
                cache[name] = model.encoder(jfk_mel)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def jfk_mel(jfk) -> torch.Tensor:
    """(1, 80, 3000) log-mel of the JFK clip (liteasr's front end; its parity with transformers'
    feature extractor is tested in test_audio.py, so both models here see identical input)."""
    return log_mel_spectrogram(pad_or_trim(torch.from_numpy(jfk.copy())))[None]


def _forced_tokens(model) -> torch.Tensor:
    """(1, T) prompt + the model's own transcript of the clip + <|endoftext|>: a realistic decoder input."""
    tok = model.tokenizer
    prompt = tok.sot_sequence("en", "transcribe", model.is_multilingual, timestamps=False)
    text = tok.encode(" And so my fellow Americans, ask not what your country can do for you, "
                      "ask what you can do for your country.")
    return torch.tensor([prompt + text + [tok.eot]])


# ---------------------------------------------------------------------------------------------------
# parity with transformers (same fp32 weights, saved by liteasr.save and loaded by from_pretrained)


@pytest.mark.parametrize("name", MODELS)
@torch.inference_mode()
def test_encoder_matches_transformers(request, name, jfk_mel, our_features):
    ours, hf = _models(request, name)
    a = our_features(ours, name)
    b = hf.model.encoder(jfk_mel).last_hidden_state
    assert a.shape == b.shape == (1, 1500, ours.dims.d_model)
    diff = (a - b).abs().max().item()
    print(f"{name}: encoder max|diff| = {diff:.2e}, max|out| = {b.abs().max().item():.1f}")
    # Same fp32 operations up to summation order (SDPA vs transformers' attention kernel, fused
    # addmm vs matmul+add): a few ulps per op, compounded over 4-6 layers of O(10)-sized
    # activations, lands at ~1e-5. A wrong weight, transposed head split, missing scale or a
    # position-embedding off-by-one moves outputs by >= 1e-1.
    assert diff < 1e-4


@pytest.mark.parametrize("name", MODELS)
@torch.inference_mode()
def test_teacher_forced_logits_match_transformers(request, name, jfk_mel, our_features):
    ours, hf = _models(request, name)
    tokens = _forced_tokens(ours)
    a = ours.decoder(tokens, ours.decoder.new_cache(our_features(ours, name)))  # = ours(jfk_mel, tokens)
    b = hf(input_features=jfk_mel, decoder_input_ids=tokens).logits
    assert a.shape == b.shape == (1, tokens.shape[1], ours.dims.vocab_size)
    rel = ((a - b).abs().max() / b.abs().max()).item()
    print(f"{name}: logits max|diff| = {(a - b).abs().max().item():.2e}, relative to max|logit| {rel:.2e}")
    # Logits reach ~30 in magnitude; a relative 1e-5 (~3e-4 absolute) is fp32 summation-order noise
    # through encoder + decoder. A wrong causal mask, cache write or cross-attention moves
    # logits by whole units.
    assert rel < 1e-5
    # Greedy choices agree at every position (what decoding actually consumes).
    assert torch.equal(a.argmax(-1), b.argmax(-1))


# ---------------------------------------------------------------------------------------------------
# LowRankLinear


def _factor(linear: nn.Linear, rank: int | None = None) -> LowRankLinear:
    """Factor a dense layer by SVD, keeping `rank` singular values (all when None)."""
    w = linear.weight.detach()  # (out, in)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # w = u diag(s) vh
    r = rank or s.numel()
    w1 = (vh[:r].T * s[:r]).contiguous()  # (in, r) = V_r S_r
    w2 = u[:, :r].T.contiguous()  # (r, out) = U_r^T, so w1 @ w2 = w^T restricted to rank r
    bias = linear.bias.detach().clone() if linear.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return LowRankLinear.from_factors(w1, w2, bias)


@pytest.mark.parametrize("d_in,d_out,bias", [(64, 64, True), (64, 160, True), (160, 64, True), (64, 64, False)])
def test_full_rank_factorisation_reproduces_dense(d_in, d_out, bias):
    dense = nn.Linear(d_in, d_out, bias=bias, dtype=torch.float64)
    x = torch.randn(3, 7, d_in, dtype=torch.float64)  # (B, T, in): forward flattens and restores the batch dims
    ref = dense(x)
    svd = _factor(dense)
    assert (svd.in_features, svd.out_features, svd.rank) == (d_in, d_out, min(d_in, d_out))
    assert svd.weight1.shape == (d_in, svd.rank) and svd.weight2.shape == (svd.rank, d_out)
    # The trivial factorisation weight1 = W^T (in, out), weight2 = I (out, out).
    trivial = LowRankLinear.from_factors(dense.weight.detach().T.clone(), torch.eye(d_out, dtype=torch.float64),
                                         svd.bias.detach().clone())
    for layer in (svd, trivial):
        diff = (layer(x) - ref).abs().max().item()
        w_diff = (dense_weight(layer)[0] - dense.weight).abs().max().item()
        print(f"{layer}: max|y diff| {diff:.1e}, max|W diff| {w_diff:.1e}")
        # fp64: an SVD reconstruction is exact to ~1e-15 relative; 1e-12 is far below any layout
        # error (a transposed factor changes outputs by O(1)).
        assert diff < 1e-12 and w_diff < 1e-12
    assert layer(x[0, 0]).shape == (d_out,)  # 1-D input works too


def test_truncated_factorisation_is_best_rank_r():
    """A rank-r LowRankLinear built from the truncated SVD computes the best rank-r approximation
    of W (Eckart-Young): the Frobenius error equals the norm of the dropped singular values."""
    dense = nn.Linear(96, 80, dtype=torch.float64)
    s = torch.linalg.svdvals(dense.weight.detach())
    layer = _factor(dense, rank=16)
    assert layer.rank == 16 and "rank=16" in repr(layer)
    err = torch.linalg.matrix_norm(dense_weight(layer)[0] - dense.weight).item()
    expected = s[16:].norm().item()
    print(f"rank-16 error {err:.6f}, expected {expected:.6f}")
    assert err == pytest.approx(expected, rel=1e-10)
    # ... and forward agrees with that (out, in) matrix: y = x W_r^T + b.
    x = torch.randn(5, 96, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ dense_weight(layer)[0].T + dense.bias, rtol=0, atol=1e-12)


@torch.inference_mode()
def test_full_rank_encoder_equals_dense_encoder(tiny_en, jfk_mel):
    """Every encoder linear of tiny.en swapped (set_module) for its full-rank SVD factorisation, in
    fp64: the encoder output is unchanged, and low_rank_config reports the ranks."""
    dense = copy.deepcopy(tiny_en.encoder).double()
    model = copy.deepcopy(tiny_en).double()
    linears = encoder_linears(model)
    assert len(linears) == 6 * tiny_en.dims.encoder_layers
    for name, layer in linears.items():
        set_module(model, name, _factor(layer))
    assert all(isinstance(m, LowRankLinear) for m in encoder_linears(model).values())
    d = tiny_en.dims.d_model  # full rank = min(in, out) = d_model for every encoder linear
    assert model.low_rank_config == [{"q_proj": d, "k_proj": d, "v_proj": d, "out_proj": d, "fc1": d, "fc2": d}] * 4
    mel = jfk_mel[..., :600].double()  # 6 s (300 positions): enough signal, a fifth of the fp64 cost
    diff = (model.encoder(mel) - dense(mel)).abs().max().item()
    print(f"full-rank factored vs dense encoder (fp64): max|diff| {diff:.1e}")
    assert diff < 1e-9  # fp64 through 4 layers: ~1e-13 observed; any mistake is O(1)


# ---------------------------------------------------------------------------------------------------
# KV-cached decoding and short inputs


@pytest.mark.parametrize("name", MODELS)
@torch.inference_mode()
def test_incremental_decoder_equals_full_pass(request, name, our_features):
    model, _ = _models(request, name)
    tok = model.tokenizer
    prompt = tok.sot_sequence("en", "transcribe", model.is_multilingual, timestamps=False)
    # Two different sequences in one batch: also checks that batch rows do not mix.
    seqs = [prompt + tok.encode(" Ask not what your country can do for you."),
            prompt + tok.encode(" The quick brown fox jumps over the lazy dog.")]
    n = min(map(len, seqs))
    tokens = torch.tensor([s[:n] for s in seqs])  # (2, T)
    jfk_features = our_features(model, name)
    features = torch.cat([jfk_features, jfk_features.flip(1)])  # two different "audios"
    full = model.decoder(tokens, model.decoder.new_cache(features))  # (2, T, V)

    cache = model.decoder.new_cache(features)
    steps = torch.cat([model.decoder(tokens[:, i: i + 1], cache, i) for i in range(n)], dim=1)
    # The way decode() runs it: the prompt in one call, then one token per call.
    cache = model.decoder.new_cache(features)
    p = len(prompt)
    mixed = torch.cat([model.decoder(tokens[:, :p], cache)]
                      + [model.decoder(tokens[:, i: i + 1], cache, torch.tensor(i)) for i in range(p, n)], dim=1)
    scale = full.abs().max().item()
    for label, out in (("one by one", steps), ("prompt then steps", mixed)):
        rel = (out - full).abs().max().item() / scale
        print(f"{name} {label}: max|diff| / max|logit| = {rel:.1e}")
        # Same weights and inputs, only different matmul shapes (T=1 vs T=n): fp32 summation noise.
        assert rel < 1e-5
    # The second row really is different (so the batch check above is not vacuous).
    assert (full[0] - full[1]).abs().max() > 1.0


@torch.inference_mode()
@pytest.mark.parametrize("frames", [1000, 999, 2])
def test_encoder_accepts_fewer_frames(tiny_en, jfk_mel, frames):
    out = tiny_en.encoder(jfk_mel[..., :frames])
    assert out.shape == (1, (frames + 1) // 2, tiny_en.dims.d_model)  # conv2 has stride 2, padding 1
    assert torch.isfinite(out).all()
