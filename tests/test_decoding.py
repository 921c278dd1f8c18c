"""liteasr.decoding's searches and fallback against openai-whisper itself, and their properties.

openai-whisper (a test dependency; `pip install --no-deps openai-whisper tiktoken`) runs our real weights through
its own checkpoint format (tests/openai_whisper_ref.py). Differences that remain, by design:
- openai-whisper's transcribe pads a window shorter than 30 s with zeros *in log-mel space*; liteasr (like
  transformers) computes the log-mel of the zero-padded audio. The reference runs below are given liteasr's
  windows (`same_windows`), so that what is compared is decoding, not feature padding: with openai-whisper's own
  padding 3 of 8 short check clips change by a word on tiny.en in either implementation.
- Sampling (temperature > 0) uses counter-based noise from an explicit seed, openai-whisper the global torch RNG:
  windows that fall back agree on *whether* and *from where* they fall back, not on the sampled text.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from liteasr.audio import N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram
from liteasr.decoding import (BeamState, DecodingOptions, GreedyState, RuleTensors, Search, TokenRules, beam_select,
                              decode, gumbel_noise)
from liteasr.transcribe import Job, TranscribeOptions, decode_windows, transcribe

sys.path.insert(0, str(Path(__file__).parent))
from openai_whisper_ref import openai_whisper_model  # noqa: E402

SCHEDULE = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
PARITY_CLIPS = 4  # short check clips for the end-to-end comparisons (CPU time: ~10 s per clip and mode)


@pytest.fixture(scope="module")
def ow_tiny(tiny_en, tmp_path_factory):
    return openai_whisper_model(tiny_en, "tiny.en", tmp_path_factory.mktemp("ow"))


@pytest.fixture(scope="module")
def short_clips(check_clips, audio_cache) -> list[tuple[str, np.ndarray]]:
    rows = sorted((r for r in check_clips if r["duration_s"] <= 8), key=lambda r: r["id"])[:PARITY_CLIPS]
    return [(r["id"], audio_cache(r["path"])) for r in rows]


def window_mel(audio: np.ndarray, n_mels: int = 80) -> torch.Tensor:
    """liteasr's first window of `audio`: (n_mels, 3000)."""
    return log_mel_spectrogram(audio, n_mels, padding=N_SAMPLES)[:, :N_FRAMES]


def same_windows(ref, audio: np.ndarray, **options) -> dict:
    """openai-whisper's transcribe with liteasr's window features: its `pad_or_trim(mel[:, seek:seek+n])` becomes
    `mel[:, seek:seek+3000]` (the log-mel of the audio that follows, zeros after the end), found from the view's
    offset into the whole log-mel."""
    import whisper  # noqa: F401

    wt = sys.modules["whisper.transcribe"]
    original_mel, original_pad = wt.log_mel_spectrogram, wt.pad_or_trim
    whole = {}

    def mel(*a, **k):
        whole["mel"] = original_mel(*a, **k)
        return whole["mel"]

    def pad(segment, length=N_FRAMES, **k):
        m = whole["mel"]
        seek = (segment.data_ptr() - m.data_ptr()) // (m.element_size() * m.stride(1))
        return m[:, seek: seek + length]

    wt.log_mel_spectrogram, wt.pad_or_trim = mel, pad
    try:
        return wt.transcribe(ref, audio.astype(np.float32), verbose=None, fp16=False, **options)
    finally:
        wt.log_mel_spectrogram, wt.pad_or_trim = original_mel, original_pad


def assert_same_transcript(ours: dict, theirs: dict, sampled_ok: bool = False) -> None:
    """Same segments (times, timestamp and text tokens, temperature, avg_logprob to float rounding) and text;
    with sampled_ok, segments decoded at temperature > 0 need only agree on that temperature being reached."""
    if sampled_ok and any(s["temperature"] > 0 for s in theirs["segments"]):
        assert [s["temperature"] > 0 for s in ours["segments"]][:1] == [s["temperature"] > 0 for s in theirs["segments"]][:1]
        return
    want = [s for s in theirs["segments"] if s["text"].strip()]
    assert ours["text"] == theirs["text"].strip()
    assert [s["tokens"] for s in ours["segments"]] == [s["tokens"] for s in want]
    assert [t for s in ours["segments"] for t in (s["start"], s["end"])] == pytest.approx(
        [t for s in want for t in (s["start"], s["end"])], abs=1e-6)
    for a, b in zip(ours["segments"], want):
        assert (a["seek"], a["temperature"]) == (b["seek"], b["temperature"])
        assert a["avg_logprob"] == pytest.approx(b["avg_logprob"], abs=1e-4)
        assert a["compression_ratio"] == pytest.approx(b["compression_ratio"])
        assert a["no_speech_prob"] == pytest.approx(b["no_speech_prob"], abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# the search itself against openai-whisper's decode (same windows, one batch)


@pytest.mark.parametrize("opts", [dict(beam_size=5), dict(beam_size=5, patience=2.0), dict(beam_size=3, length_penalty=0.5),
                                  dict()], ids=["beam5", "beam5-patience2", "beam3-lp0.5", "greedy"])
def test_decode_equals_openai_whisper(tiny_en, ow_tiny, short_clips, opts):
    """Every window of a batch (decoded together) gets openai-whisper's tokens, avg_logprob and no_speech_prob, with timestamps."""
    import whisper

    mel = torch.stack([window_mel(a) for _, a in short_clips[:3]])
    ours = decode(tiny_en, mel, DecodingOptions(timestamps=True, **opts))
    # one window at a time: openai-whisper 20250625's beam search fails on a batch (its cross-attention cache is
    # not repeated per beam)
    theirs = [whisper.decode(ow_tiny, m, whisper.DecodingOptions(language="en", fp16=False, **opts)) for m in mel]
    for a, b in zip(ours, theirs):
        assert a.tokens == b.tokens and a.text == b.text
        assert a.avg_logprob == pytest.approx(b.avg_logprob, abs=1e-4)
        assert a.no_speech_prob == pytest.approx(b.no_speech_prob, abs=1e-5)
        assert a.compression_ratio == pytest.approx(b.compression_ratio)


def test_beam_select_keeps_openai_whisper_candidates(tokenizer_tiny):
    """One beam step on hand-made log-probabilities: the kept beams, their sources and the finished hypotheses
    are openai-whisper's (ranked by cumulative log-prob; an ending candidate counts only if ranked before the
    K-th kept beam; the first step keeps one copy of the identical beams' candidates)."""
    tok, v, k = tokenizer_tiny, 51864, 2
    rules = RuleTensors(TokenRules(suppress=(), begin_suppress=(), eot=tok.eot, no_timestamps=tok.no_timestamps), v,
                        "cpu")
    st, bs = GreedyState(2 * k, 16, "cpu"), BeamState(2, k, 2, 16, "cpu")
    st.reset(3)
    logits = torch.full((2 * k, v), -30.0)
    logits[:, [10, 11, 12]] = torch.tensor([2.0, 1.0, 0.0])  # identical beams at the first step
    src = beam_select(logits.clone(), st, bs, rules, first=True)
    assert st.history[:, 0].tolist() == [10, 11, 10, 11] and src.tolist() == [0, 0, 2, 2]
    logits = torch.full((2 * k, v), -30.0)
    logits[0, [tok.eot, 20, 21]] = torch.tensor([3.0, 0.0, -1.0])  # window 0, beam 0: ending is likeliest
    logits[1, [22, 23, tok.eot]] = torch.tensor([1.0, 0.5, -5.0])
    logits[2, [30, 31, tok.eot]] = torch.tensor([0.0, -0.1, -9.0])  # window 1: its <|endoftext|> ranks too low
    logits[3, [32, 33, 34]] = torch.tensor([0.0, -0.1, -0.2])
    sums = st.sum_logprob.clone()
    lp = logits.log_softmax(-1)
    src = beam_select(logits.clone(), st, bs, rules, first=False)
    fin = bs.finished()
    assert fin[0] == [([10], pytest.approx(float(sums[0] + lp[0, tok.eot])))] and fin[1] == []
    # window 0 keeps (10, 20) and the likelier of (11, 22) / (10, 21); window 1 its two best
    cands0 = sorted([(float(sums[0] + lp[0, 20]), 0, 20), (float(sums[0] + lp[0, 21]), 0, 21),
                     (float(sums[1] + lp[1, 22]), 1, 22), (float(sums[1] + lp[1, 23]), 1, 23)], reverse=True)[:2]
    assert [(s, t) for _, s, t in cands0] == [(int(src[i]), int(st.history[i, 1])) for i in range(2)]
    assert st.sum_logprob[:2].tolist() == pytest.approx([c[0] for c in cands0])


@pytest.fixture(scope="module")
def tokenizer_tiny(tiny_en):
    return tiny_en.tokenizer


# ---------------------------------------------------------------------------------------------------
# properties


def test_beam_1_equals_greedy(tiny_en, short_clips):
    mel = torch.stack([window_mel(a) for _, a in short_clips[:2]])
    for ts in (False, True):
        greedy = decode(tiny_en, mel, DecodingOptions(timestamps=ts))
        beam = decode(tiny_en, mel, DecodingOptions(timestamps=ts, beam_size=1))
        assert [r.tokens for r in beam] == [r.tokens for r in greedy]
        assert [r.avg_logprob for r in beam] == pytest.approx([r.avg_logprob for r in greedy], abs=1e-6)


def test_gumbel_noise_is_a_pure_function():
    """The sampling noise depends only on (seed, temperature, sample, step, token): not on the batch it is in."""
    col, step = torch.arange(1000), torch.tensor(7)
    a = gumbel_noise(0, 0.2, torch.tensor([0, 1, 2]), step, col)
    b = gumbel_noise(0, 0.2, torch.tensor([2]), step, col)
    assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])
    assert not torch.equal(a, gumbel_noise(1, 0.2, torch.tensor([0, 1, 2]), step, col))
    assert not torch.equal(a, gumbel_noise(0, 0.4, torch.tensor([0, 1, 2]), step, col))
    u = torch.exp(-torch.exp(-gumbel_noise(0, 1.0, torch.arange(50), step, torch.arange(51864))))  # back to U(0,1)
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.01


def looping_audio() -> np.ndarray:
    """30 s of 100-ms 1-kHz beeps twice a second: tiny.en at temperature 0 with timestamps answers with one
    sentence repeated until the token limit (gzip ratio ~13)."""
    t = np.arange(30 * SAMPLE_RATE) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 1000 * t) * ((t % 0.5) < 0.1)).astype(np.float32)


def test_loop_is_redecoded_and_fallback_repeats(tiny_en):
    mel = window_mel(looping_audio())[None]
    first = decode(tiny_en, mel, DecodingOptions(timestamps=True))[0]
    assert first.compression_ratio > 2.4  # the window loops at temperature 0
    options = DecodingOptions(timestamps=True, temperature=SCHEDULE, seed=3)
    r1 = decode(tiny_en, mel, options)[0]
    assert r1.temperature > 0 and r1.compression_ratio <= 2.4  # re-decoded, the loop is gone
    r2 = decode(tiny_en, mel, options)[0]
    assert (r2.tokens, r2.temperature, r2.avg_logprob) == (r1.tokens, r1.temperature, r1.avg_logprob)


def test_only_failing_windows_are_redecoded(tiny_en, short_clips, monkeypatch):
    """A batch of a looping window and speech: the speech window is decoded once, at temperature 0, with the
    same result as alone; only the looping one goes on through the schedule."""
    import liteasr.decoding as d

    mel = torch.stack([window_mel(short_clips[0][1]), window_mel(looping_audio())])
    passes = []
    original = d.decode_pass

    def counting(model, engine, options, temperature, rules, rows, *a):
        passes.append((temperature, list(rows)))
        return original(model, engine, options, temperature, rules, rows, *a)

    monkeypatch.setattr(d, "decode_pass", counting)
    got = decode(tiny_en, mel, DecodingOptions(timestamps=True, temperature=SCHEDULE))
    assert passes[0] == (0.0, [0, 1]) and all(rows == [1] for _, rows in passes[1:]) and len(passes) > 1
    with torch.inference_mode():
        alone = original(tiny_en, d.EagerEngine(tiny_en, tiny_en.encoder(mel[:1])), DecodingOptions(timestamps=True), 0.0,
                         TokenRules.from_tokenizer(tiny_en.tokenizer, True), [0],
                         [(tiny_en.tokenizer.sot_sequence("en", "transcribe", False, True), 0)], ["en"])[0]
    assert got[0].tokens == alone.tokens and got[0].temperature == 0.0


# ---------------------------------------------------------------------------------------------------
# prompts


def test_prompts_of_different_lengths_in_one_call(tiny_en, short_clips):
    """Windows with prompts of different lengths decoded in one decode_windows call give what each gives alone."""
    tok = tiny_en.tokenizer
    opts = TranscribeOptions(temperature=0.0, timestamps=True)
    jobs = [Job(tiny_en, a, opts, name) for name, a in short_clips[:3]]
    prompts = [(), tuple(tok.encode(" Kathleen reads the Arctic sentences.")), tuple(tok.encode(" Hello."))]
    windows = [j.window() for j in jobs]
    windows = [type(w)(w.job, w.mel, w.options, w.language, p) for w, p in zip(windows, prompts)]
    together = decode_windows(tiny_en, windows)
    for w, r in zip(windows, together):
        alone = decode_windows(tiny_en, [w])[0]
        assert (r.tokens, r.avg_logprob) == (alone.tokens, pytest.approx(alone.avg_logprob, abs=1e-5))


@pytest.mark.slow
def test_initial_prompt_and_prefix_equal_openai_whisper(tiny_en, ow_tiny, short_clips):
    name, audio = short_clips[1]
    for opts in (dict(initial_prompt="Kathleen, Arctic, Jean."), dict(initial_prompt="Um, like, you know.",
                                                                       carry_initial_prompt=True)):
        ours = transcribe(tiny_en, audio, timestamps=True, temperature=0.0, **opts)
        theirs = same_windows(ow_tiny, audio, temperature=0.0, **opts)
        assert_same_transcript(ours, theirs)
    mel = window_mel(audio)[None]
    import whisper

    ours = decode(tiny_en, mel, DecodingOptions(timestamps=True, prefix="So"))[0]
    theirs = whisper.decode(ow_tiny, mel, whisper.DecodingOptions(language="en", fp16=False, prefix="So"))[0]
    assert ours.tokens == theirs.tokens and ours.avg_logprob == pytest.approx(theirs.avg_logprob, abs=1e-4)


# ---------------------------------------------------------------------------------------------------
# transcribe end to end against openai-whisper's transcribe


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["beam5+fallback", "greedy+fallback"])
def test_transcribe_equals_openai_whisper(tiny_en, ow_tiny, short_clips, mode):
    """openai-whisper's CLI defaults (beam 5, best_of 5, fallback) and its library defaults (greedy, fallback):
    same segments and text on the short check clips (a window that falls back is sampled differently)."""
    opts = dict(beam_size=5, best_of=5) if mode.startswith("beam") else {}
    for name, audio in short_clips:
        ours = transcribe(tiny_en, audio, timestamps=True, temperature=SCHEDULE, **opts)
        theirs = same_windows(ow_tiny, audio, temperature=SCHEDULE, **opts)
        print(name, "|", ours["text"], "|", theirs["text"])
        assert_same_transcript(ours, theirs, sampled_ok=True)


def test_segments_have_openai_whisper_schema(tiny_en, short_clips):
    res = transcribe(tiny_en, short_clips[0][1], timestamps=True, beam_size=2)
    keys = {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio",
            "no_speech_prob"}
    assert res["segments"] and all(set(s) == keys for s in res["segments"])
    assert [s["id"] for s in res["segments"]] == list(range(len(res["segments"])))


def test_options_refuse_nonsense():
    with pytest.raises(ValueError, match="beam_size"):
        DecodingOptions(beam_size=0)
    with pytest.raises(ValueError, match="patience"):
        DecodingOptions(patience=2.0)
    with pytest.raises(ValueError, match="length_penalty"):
        DecodingOptions(beam_size=2, length_penalty=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DecodingOptions(temperature=(0.0, -0.2))


# ---------------------------------------------------------------------------------------------------
# word timestamps through transcribe, subtitles, flags


@pytest.mark.slow
def test_word_timestamps_equal_openai_whisper(tiny_en, ow_tiny, jfk):
    """Same heads, same median filter and DTW on the same window: every word, its start/end and probability
    agree. Tolerance 0.02 s: one audio-feature frame, the DTW's resolution (a near-tie in the cost matrix may
    move one boundary by a frame under float rounding); in practice they are equal."""
    ours = transcribe(tiny_en, jfk, word_timestamps=True, temperature=0.0)
    theirs = same_windows(ow_tiny, jfk, word_timestamps=True, temperature=0.0)
    a = [w for s in ours["segments"] for w in s["words"]]
    b = [w for s in theirs["segments"] for w in s["words"]]
    assert [w["word"] for w in a] == [w["word"] for w in b] and len(a) > 20
    assert [t for w in a for t in (w["start"], w["end"])] == pytest.approx([t for w in b for t in (w["start"], w["end"])],
                                                                           abs=0.02)
    assert [w["probability"] for w in a] == pytest.approx([w["probability"] for w in b], abs=1e-3)
    assert [(s["start"], s["end"]) for s in ours["segments"]] == [(s["start"], s["end"]) for s in theirs["segments"]]


def _worded(words: list[tuple[str, float, float]], cuts: list[int]) -> dict:
    segs, start = [], 0
    for end in cuts + [len(words)]:
        ws = [{"word": w, "start": a, "end": b, "probability": 1.0} for w, a, b in words[start:end]]
        segs.append({"start": ws[0]["start"], "end": ws[-1]["end"], "text": "".join(w["word"] for w in ws).strip(),
                     "words": ws})
        start = end
    return {"text": " ".join(s["text"] for s in segs), "segments": segs}


def test_subtitles_cut_by_words():
    from liteasr.transcribe import SubtitleOptions, render

    words = [(f" word{i}", i * 0.5, i * 0.5 + 0.4) for i in range(12)] + [(" late", 12.0, 12.5)]  # 6-s pause
    res = _worded(words, [5])
    plain = render(res, "srt").strip().split("\n\n")
    assert len(plain) == 2  # segment bounds kept without both limits
    cues = render(res, "srt", SubtitleOptions(max_line_width=14, max_line_count=2)).strip().split("\n\n")
    for cue in cues:
        lines = cue.split("\n")[2:]
        assert 1 <= len(lines) <= 2 and all(len(x) <= 14 for x in lines)
    assert cues[-1].split("\n")[2] == "late"  # the long pause starts a new cue
    assert " ".join(" ".join(c.split("\n")[2:]) for c in cues).split() == [w.strip() for w, _, _ in words]
    hl = render(res, "vtt", SubtitleOptions(highlight_words=True)).split("\n\n")[1:-1]
    assert sum("<u>" in c for c in hl) == len(words) and "<u>word0</u> word1" in hl[0]


def test_cli_flags_map_to_transcribe_options():
    from liteasr.cli import _decoding_options, build_parser
    from liteasr.transcribe import TranscribeOptions

    args = build_parser().parse_args(["transcribe", "x.wav"])
    opts = TranscribeOptions(**_decoding_options(args))
    assert (opts.beam_size, opts.best_of, opts.temperature) == (5, 5, SCHEDULE)  # openai-whisper's CLI defaults
    args = build_parser().parse_args(["transcribe", "x.wav", "--beam-size", "0", "--temperature-increment-on-fallback",
                                      "None", "--condition-on-previous-text", "False", "--initial-prompt", "Hi",
                                      "--word-timestamps", "True", "--logprob-threshold", "None"])
    opts = TranscribeOptions(**_decoding_options(args))
    assert (opts.beam_size, opts.temperature, opts.condition_on_previous_text) == (None, (0.0,), False)
    assert (opts.initial_prompt, opts.word_timestamps, opts.logprob_threshold) == ("Hi", True, None)


def test_mlx_searches_equal_torch_reference(tiny_en):
    """The MLX twin decodes through the same decode_features (its network, liteasr.decoding's rules and
    searches): beam search and the fallback's seeded samples give the torch reference's tokens. A random model of
    small shapes keeps it fast on the netlib-BLAS CPU wheel; its peaky logits make float ties unlikely."""
    pytest.importorskip("mlx.core")
    import liteasr.mlx
    from liteasr.model import Dims, Whisper

    torch.manual_seed(0)
    model = Whisper(Dims(vocab_size=51864, d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128,
                         decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=128)).eval()
    model.tokenizer = tiny_en.tokenizer
    twin = liteasr.mlx.from_torch(model, "float32")
    mel = torch.randn(2, 80, 3000)
    for options in (DecodingOptions(beam_size=3, max_new_tokens=20),
                    DecodingOptions(temperature=(0.0, 0.6), best_of=2, logprob_threshold=0.0, max_new_tokens=20)):
        ref = decode(model, mel, options, prompts=[[], [300, 301]])
        got = twin.decode(mel, options, prompts=[[], [300, 301]])
        assert [r.tokens for r in got] == [r.tokens for r in ref]
        assert [r.temperature for r in got] == [r.temperature for r in ref]
        assert [r.avg_logprob for r in got] == pytest.approx([r.avg_logprob for r in ref], abs=1e-3)
