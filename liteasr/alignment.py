"""Word-level timestamps from cross-attention: openai-whisper's alignment, batched over windows.

For each decoded 30-s window the decoder is run once more, teacher-forced on
<|sot|> [<|lang|> <|task|>] <|notimestamps|> + the window's text tokens + <|endoftext|>, and the
cross-attention weights of a few "alignment heads" (those whose attention follows the speech) are
read out. As in openai-whisper's `timing.py`: softmax over the audio frames of the window,
standardise each head over the tokens, median-filter along time (width 7), average the heads, and
find the monotonic token-to-frame path by dynamic time warping. Token boundaries become word
boundaries through the tokenizer's word splitting, punctuation is merged into its word, and the
segment boundaries are refined with openai-whisper's heuristics (long words at pauses and
sentence ends are cut to twice the median word length).

model.py's attention runs through SDPA, which returns no weights: forward hooks on the decoder
layers' `encoder_attn` recompute softmax(q kᵀ/√d) for the chosen heads only, from the module's
q_proj and the cross keys it is given. The decoder is dense in every liteasr model, so factored
encoders align unchanged.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .model import Dims, KVCache, Whisper
from .tokenizer import TIME_PRECISION, Tokenizer

FRAMES_PER_TOKEN = 2  # mel frames per audio-feature frame (the encoder's stride-2 convolution)
TOKENS_PER_SECOND = 1 / TIME_PRECISION  # audio-feature frames per second (50)
# Languages written without spaces between words: split at every complete character instead.
UNSPACED_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})
SENTENCE_END_MARKS = ".。!！?？"

# openai-whisper's `_ALIGNMENT_HEADS` (whisper/__init__.py, release 20250625) decoded to (layer, head)
# pairs, keyed by the dims that identify each model: (num_mel_bins, vocab_size, d_model,
# decoder_layers). large-v1 and large-v2 share their dims and have different heads, so neither is
# listed (their Hugging Face checkpoints carry their heads in generation_config.json).
KNOWN_HEADS: dict[tuple[int, int, int, int], tuple[tuple[int, int], ...]] = {
    (80, 51864, 384, 4): ((1, 0), (2, 0), (2, 5), (3, 0), (3, 1), (3, 2), (3, 3), (3, 4)),  # tiny.en
    (80, 51865, 384, 4): ((2, 2), (3, 0), (3, 2), (3, 3), (3, 4), (3, 5)),  # tiny
    (80, 51864, 512, 6): ((3, 3), (4, 7), (5, 1), (5, 5), (5, 7)),  # base.en
    (80, 51865, 512, 6): ((3, 1), (4, 2), (4, 3), (4, 7), (5, 1), (5, 2), (5, 4), (5, 6)),  # base
    (80, 51864, 768, 12): ((6, 6), (7, 0), (7, 3), (7, 8), (8, 2), (8, 5), (8, 7), (9, 0), (9, 4), (9, 8),  # small.en
                           (9, 10), (10, 0), (10, 1), (10, 2), (10, 3), (10, 6), (10, 11), (11, 2), (11, 4)),
    (80, 51865, 768, 12): ((5, 3), (5, 9), (8, 0), (8, 4), (8, 7), (8, 8), (9, 0), (9, 7), (9, 9), (10, 5)),  # small
    (80, 51864, 1024, 24): ((11, 4), (14, 1), (14, 12), (14, 14), (15, 4), (16, 0), (16, 4), (16, 9), (17, 12),
                            (17, 14), (18, 7), (18, 10), (18, 15), (20, 0), (20, 3), (20, 9), (20, 14),
                            (21, 12)),  # medium.en
    (80, 51865, 1024, 24): ((13, 15), (15, 4), (15, 15), (16, 1), (20, 0), (23, 4)),  # medium
    (128, 51866, 1280, 32): ((7, 0), (10, 17), (12, 18), (13, 12), (16, 1), (17, 14), (19, 11), (21, 4), (24, 1),
                             (25, 6)),  # large-v3
    (128, 51866, 1280, 4): ((2, 4), (2, 11), (3, 3), (3, 6), (3, 11), (3, 14)),  # large-v3-turbo
}


@dataclass(frozen=True)
class AlignmentOptions:
    """How words are timed; the defaults are openai-whisper's."""

    task: str = "transcribe"  # the task token of the teacher-forced prompt (multilingual models)
    median_filter_width: int = 7  # odd; along time, per head
    prepend_punctuations: str = "\"'“¿([{-"  # merged into the following word
    append_punctuations: str = "\"'.。,，!！?？:：”)]}、"  # merged into the preceding word
    heads: tuple[tuple[int, int], ...] | None = None  # (layer, head) pairs; None: see `alignment_heads`


@dataclass(frozen=True)
class WindowText:
    """What was decoded in one window: the input of `word_timestamps`.

    `frames` is the number of mel frames of real audio in the window (openai-whisper's
    `segment_size`, at most 3000); attention to the padding after it is ignored."""

    tokens: list[list[int]]  # text tokens per segment (ids >= <|endoftext|>, e.g. timestamps, are ignored)
    spans: list[tuple[float, float]]  # (start, end) per segment, in seconds from the start of the input
    offset: float  # seconds: where the window starts in the input (seek * 0.01)
    frames: int  # mel frames of real audio in the window
    language: str = "en"
    last_speech: float = 0.0  # end of the last word before this window (seconds), 0 for the first


@dataclass
class Word:
    word: str  # with its leading space and merged punctuation, as openai-whisper gives it
    start: float  # seconds from the start of the input, rounded to 10 ms
    end: float
    probability: float  # mean probability of the word's tokens under teacher forcing


@dataclass
class TimedSegment:
    """One segment after alignment: its refined (start, end) and its words (empty: no text)."""

    start: float
    end: float
    words: list[Word] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# heads


def alignment_heads(model: Whisper) -> tuple[tuple[int, int], ...]:
    """The (layer, head) pairs of the decoder's cross-attention that follow the speech.

    In order of preference: the checkpoint's own list (`alignment_heads` of a Hugging Face
    generation_config.json or a CTranslate2 config.json, kept by the loader in
    `model.generation_config`); openai-whisper's heads for a model with the dims of a released
    Whisper (KNOWN_HEADS); otherwise every head of the decoder's second half, openai-whisper's
    default."""
    d: Dims = model.dims
    stored = (getattr(model, "generation_config", None) or {}).get("alignment_heads")
    if stored:
        heads = tuple((int(layer), int(head)) for layer, head in stored)
        bad = [(l, h) for l, h in heads if not (0 <= l < d.decoder_layers and 0 <= h < d.decoder_attention_heads)]
        if bad:
            raise ValueError(f"generation_config alignment_heads: {bad[0]} is not a (layer, head) of this decoder "
                             f"({d.decoder_layers} layers x {d.decoder_attention_heads} heads)")
        return heads
    known = KNOWN_HEADS.get((d.num_mel_bins, d.vocab_size, d.d_model, d.decoder_layers))
    if known is not None:
        return known
    return tuple((layer, head) for layer in range(d.decoder_layers // 2, d.decoder_layers)
                 for head in range(d.decoder_attention_heads))


# ---------------------------------------------------------------------------------------------------
# public entry point


@torch.inference_mode()
def word_timestamps(model: Whisper, features: Tensor, windows: list[WindowText],
                    options: AlignmentOptions = AlignmentOptions(), cache: KVCache | None = None,
                    ) -> list[list[TimedSegment]]:
    """Time every word of a batch of decoded windows (openai-whisper's `add_word_timestamps`, batched).

    Args:
        model: a liteasr Whisper (dense or factored encoder; the decoder is what aligns).
        features: the windows' audio features (B, S, d_model) from `model.encoder` (S = 1500 for
            30 s), or their log-mel (B, n_mels, 3000), which is then encoded here.
        windows: B `WindowText`; windows[b] describes features[b].
        options: heads, median-filter width, punctuation sets, task of the prompt.
        cache: optionally the KVCache the same B windows were decoded with (rows in the same
            order): its cross-attention keys/values are reused instead of projected again (saves
            20-35 % of the alignment time on CPU); the cache itself is not modified.

    Returns:
        Per window, one `TimedSegment` per input segment (same order): the segment's bounds refined
        as openai-whisper does and its words, in seconds from the start of the input. The next
        window of the same input takes as `last_speech` the end of the last word found here
        (openai-whisper's `last_speech_timestamp`), so the windows of one input align in order.

    Example::

        segments = word_timestamps(model, features, [WindowText([tokens], [(0.0, 4.2)], 0.0, 3000)])
        [(w.word, w.start, w.end) for w in segments[0][0].words]
    """
    if features.shape[0] != len(windows):
        raise ValueError(f"features hold {features.shape[0]} windows but {len(windows)} WindowText were given")
    is_mel = features.shape[-1] != model.dims.d_model
    max_frames = features.shape[-1] if is_mel else features.shape[1] * FRAMES_PER_TOKEN  # mel frames per window
    for i, w in enumerate(windows):
        if len(w.tokens) != len(w.spans):
            raise ValueError(f"windows[{i}]: {len(w.tokens)} token lists but {len(w.spans)} spans")
        if not FRAMES_PER_TOKEN <= w.frames <= max_frames:
            raise ValueError(f"windows[{i}]: frames={w.frames} is not a mel-frame count of the window "
                             f"({FRAMES_PER_TOKEN}..{max_frames})")
    tok: Tokenizer = model.tokenizer
    text = [[t for seg in w.tokens for t in seg if t < tok.eot] for w in windows]
    timings: list[list[_Timing]] = [[] for _ in windows]
    todo = [i for i, t in enumerate(text) if t]
    if todo:
        rows = torch.tensor(todo, device=features.device)
        found = _find_alignment(model, features.index_select(0, rows), [windows[i] for i in todo],
                                [text[i] for i in todo], options, _select(cache, rows))
        for i, t in zip(todo, found):
            timings[i] = t
    return [_refine(w, t, tok, options) for w, t in zip(windows, timings)]


# ---------------------------------------------------------------------------------------------------
# attention -> token times


@dataclass
class _Timing:
    word: str
    tokens: list[int]
    start: float  # seconds from the window start
    end: float
    probability: float


def _select(cache: KVCache | None, rows: Tensor) -> KVCache | None:
    """A fresh cache for `rows` of `cache`: the cross keys/values selected, new self-attention slots
    (so the caller's cache is left as it was)."""
    if cache is None:
        return None
    b = len(rows)
    fresh = [torch.zeros((b, *k.shape[1:]), dtype=k.dtype, device=k.device) for k in cache.self_k]
    return KVCache(fresh, [torch.zeros_like(k) for k in fresh], [k.index_select(0, rows) for k in cache.cross_k],
                   [v.index_select(0, rows) for v in cache.cross_v])


def _find_alignment(model: Whisper, features: Tensor, windows: list[WindowText], text: list[list[int]],
                    options: AlignmentOptions, cache: KVCache | None) -> list[list[_Timing]]:
    """openai-whisper's `find_alignment` for B windows with one batched decoder pass and one batched DTW."""
    tok: Tokenizer = model.tokenizer
    if cache is None and features.shape[-1] != model.dims.d_model:  # a log-mel batch (B, n_mels, frames)
        features = model.encoder(features.to(next(model.parameters()).dtype))
    if cache is None:
        cache = model.decoder.new_cache(features)
    prompts = [tok.sot_sequence(w.language, options.task, model.is_multilingual, timestamps=False) for w in windows]
    sequences = [p + t + [tok.eot] for p, t in zip(prompts, text)]
    n_ctx = model.dims.max_target_positions
    if max(map(len, sequences)) > n_ctx:
        raise ValueError(f"a window's prompt + text has {max(map(len, sequences))} tokens; the decoder holds {n_ctx}")
    width = max(map(len, sequences))
    # Rows are padded with <|endoftext|> after their end: causal attention keeps the padding from
    # changing any earlier position, and the padded rows are cut off below.
    tokens = torch.tensor([s + [tok.eot] * (width - len(s)) for s in sequences], device=features.device)  # (B, T)
    heads = options.heads or alignment_heads(model)
    qk, logits = _cross_attention_logits(model, cache, tokens, heads)  # (B, h, T, S), (B, T, V)

    matrices, probs = [], []
    for b, (w, p, t) in enumerate(zip(windows, prompts, text)):
        n = len(p) + len(t) + 1
        # (h, n, S'): the softmax covers the window's real audio only (S' = frames // 2)
        weights = qk[b, :, :n, : w.frames // FRAMES_PER_TOKEN].float().softmax(-1)
        std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)  # per head, over tokens
        weights = median_filter((weights - mean) / std, options.median_filter_width)
        # Rows from <|notimestamps|> (which predicts the first text token) to the last text token.
        matrices.append((-weights.mean(0))[len(p) - 1: n - 1].double().cpu().numpy())  # (len(t) + 1, S')
        sampled = logits[b, len(p) - 1: len(p) - 1 + len(t), : tok.eot].softmax(-1)  # (len(t), eot)
        probs.append(sampled[torch.arange(len(t)), torch.tensor(t, device=sampled.device)].tolist())
    paths = dtw(matrices)

    out = []
    for (token_index, time_index), t, p, w in zip(paths, text, probs, windows):
        words, word_tokens = split_to_word_tokens(tok, t + [tok.eot], w.language)
        if len(word_tokens) <= 1:
            out.append([])
            continue
        bounds = np.pad(np.cumsum([len(x) for x in word_tokens[:-1]]), (1, 0))
        jumps = np.pad(np.diff(token_index), (1, 0), constant_values=1).astype(bool)
        jump_times = time_index[jumps] / TOKENS_PER_SECOND  # the first frame of each token
        out.append([_Timing(word, toks, float(jump_times[i]), float(jump_times[j]), float(np.mean(p[i:j])))
                    for word, toks, i, j in zip(words, word_tokens, bounds[:-1], bounds[1:])])
    return out


def _cross_attention_logits(model: Whisper, cache: KVCache, tokens: Tensor,
                            heads: tuple[tuple[int, int], ...]) -> tuple[Tensor, Tensor]:
    """Teacher-forced logits (B, T, V) and the pre-softmax cross-attention scores q kᵀ/√d of `heads`
    (B, n_heads, T, S), in the order of `heads` sorted by (layer, head)."""
    heads = tuple(sorted(heads))
    per_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        per_layer.setdefault(layer, []).append(head)
    scores: dict[int, Tensor] = {}

    def hook_for(layer: int):
        index = torch.tensor(per_layer[layer], device=tokens.device)

        def hook(module, args, output) -> None:
            x, k = args[0], args[1]  # (B, T, d) normalised decoder states, (B, H, S, d_head) cross keys
            q = module.heads(module.q_proj(x)).index_select(1, index)  # (B, h, T, d_head)
            k = k.index_select(1, index)
            scale = q.shape[-1] ** -0.25  # split between q and k as openai-whisper does, for the same rounding
            scores[layer] = ((q * scale) @ (k * scale).transpose(-1, -2)).float()  # (B, h, T, S)
        return hook

    handles = [model.decoder.layers[layer].encoder_attn.register_forward_hook(hook_for(layer)) for layer in per_layer]
    try:
        logits = model.decoder(tokens, cache)  # (B, T, V)
    finally:
        for h in handles:
            h.remove()
    return torch.cat([scores[layer] for layer in sorted(per_layer)], dim=1), logits


def median_filter(x: Tensor, width: int) -> Tensor:
    """Median over a sliding window of odd `width` along the last dim, reflect-padded at both ends,
    as openai-whisper's `median_filter`. x (..., F) -> (..., F).

    The `width` shifted copies are sorted elementwise by an odd-even transposition network of
    min/max (width passes): the middle one is the median, element for element the value that
    sorting each window picks, at a tenth of the cost of `unfold(...).sort()` on CPU."""
    if width <= 0 or width % 2 == 0:
        raise ValueError(f"median filter width must be a positive odd number, not {width}")
    pad = width // 2
    if x.shape[-1] <= pad:  # reflect padding needs more frames than the padding
        return x
    n = x.shape[-1]
    padded = F.pad(x.reshape(1, -1, n), (pad, pad), mode="reflect").reshape(*x.shape[:-1], n + 2 * pad)
    cols = [padded[..., k: k + n] for k in range(width)]  # (..., F) each: the k-th element of every window
    for p in range(width):
        for i in range(p % 2, width - 1, 2):
            cols[i], cols[i + 1] = torch.minimum(cols[i], cols[i + 1]), torch.maximum(cols[i], cols[i + 1])
    return cols[pad]


def dtw(costs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Dynamic time warping of several cost matrices (N_b, M_b) at once -> per matrix the path as
    (token indices, frame indices), each of length N_b + M_b - (diagonal steps).

    The same recursion, tie-breaking and float32 cost accumulation as openai-whisper's `dtw_cpu`,
    vectorised along anti-diagonals (every cell of one anti-diagonal depends only on the two
    before it) and over the batch: N + M numpy steps instead of N * M scalar ones, no numba."""
    b, n, m = len(costs), max(c.shape[0] for c in costs), max(c.shape[1] for c in costs)
    # Skewed storage: cell (i, j) of the (n+1, m+1) cost table lives at [d = i + j, i]. Then the
    # three predecessors of anti-diagonal d are slices of anti-diagonals d-1 and d-2.
    cost = np.full((b, n + m + 1, n + 1), np.inf, dtype=np.float32)
    trace = np.full((b, n + m + 1, n + 1), -1, dtype=np.int8)
    cost[:, 0, 0] = 0
    x = np.full((b, n + m + 1, n + 1), np.inf)  # x[b, i + j, i] = costs[b][i - 1, j - 1]
    for k, c in enumerate(costs):
        ni, mj = c.shape
        i = np.arange(1, ni + 1)[:, None]
        j = np.arange(1, mj + 1)[None, :]
        x[k, (i + j).ravel(), np.broadcast_to(i, (ni, mj)).ravel()] = c.ravel()
    for d in range(2, n + m + 1):
        c0 = cost[:, d - 2, :n]  # (i-1, j-1)
        c1 = cost[:, d - 1, :n]  # (i-1, j)
        c2 = cost[:, d - 1, 1:]  # (i, j-1)
        t = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2)).astype(np.int8)
        best = np.where(t == 0, c0, np.where(t == 1, c1, c2))
        cost[:, d, 1:] = (x[:, d, 1:] + best).astype(np.float32)  # float64 sum stored as float32, as dtw_cpu
        trace[:, d, 1:] = t
    return [_backtrace(trace[k], *c.shape) for k, c in enumerate(costs)]


def _backtrace(trace: np.ndarray, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Follow the skewed trace (n+m+1, n+1) back from cell (i, j) to (0, 0)."""
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = 2 if i == 0 else 1 if j == 0 else trace[i + j, i]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        else:
            j -= 1
    result = np.array(path[::-1]).T
    return result[0], result[1]


# ---------------------------------------------------------------------------------------------------
# tokens -> words


def split_to_word_tokens(tok: Tokenizer, tokens: list[int], language: str) -> tuple[list[str], list[list[int]]]:
    """Group tokens into words: at spaces and punctuation, or at every complete character for
    languages written without spaces (UNSPACED_LANGUAGES). openai-whisper's `split_to_word_tokens`."""
    if language in UNSPACED_LANGUAGES:
        return _split_on_unicode(tok, tokens)
    words: list[str] = []
    word_tokens: list[list[int]] = []
    for subword, subword_tokens in zip(*_split_on_unicode(tok, tokens)):
        special = subword_tokens[0] >= tok.eot
        with_space = subword.startswith(" ")
        punctuation = subword.strip() in string.punctuation  # substring test, as openai-whisper's
        if special or with_space or punctuation or not words:
            words.append(subword)
            word_tokens.append(list(subword_tokens))
        else:
            words[-1] += subword
            word_tokens[-1].extend(subword_tokens)
    return words, word_tokens


def _split_on_unicode(tok: Tokenizer, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
    """Cut after every token at which the decoded text is complete UTF-8 (a multi-byte character
    split across tokens decodes to U+FFFD until its last byte arrives)."""
    decode = lambda ids: tok.hf.decode(ids, skip_special_tokens=False)  # noqa: E731
    full = decode(tokens)
    words, word_tokens, current, offset = [], [], [], 0
    for token in tokens:
        current.append(token)
        text = decode(current)
        if "\ufffd" not in text or full[offset + text.index("\ufffd")] == "\ufffd":
            words.append(text)
            word_tokens.append(current)
            current = []
            offset += len(text)
    return words, word_tokens


def merge_punctuations(timings: list[_Timing], prepended: str, appended: str) -> None:
    """Move prepended punctuation (opening quotes, brackets) into the next word and appended
    punctuation into the previous word, in place; emptied entries keep their place with no text."""
    i, j = len(timings) - 2, len(timings) - 1
    while i >= 0:
        previous, following = timings[i], timings[j]
        if previous.word.startswith(" ") and previous.word.strip() in prepended:
            following.word = previous.word + following.word
            following.tokens = previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(timings):
        previous, following = timings[i], timings[j]
        if not previous.word.endswith(" ") and following.word in appended:
            previous.word = previous.word + following.word
            previous.tokens = previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1


# ---------------------------------------------------------------------------------------------------
# words -> segments


def _refine(window: WindowText, timings: list[_Timing], tok: Tokenizer,
            options: AlignmentOptions) -> list[TimedSegment]:
    """openai-whisper's `add_word_timestamps` for one window: clamp over-long words, merge
    punctuation, hand the words to their segments and refine the segment bounds."""
    durations = np.array([t.end - t.start for t in timings])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    if len(durations):
        # Words at sentence boundaries may absorb a pause: cut them to twice the median length.
        for i in range(1, len(timings)):
            if timings[i].end - timings[i].start > longest:
                if timings[i].word in SENTENCE_END_MARKS:
                    timings[i].end = timings[i].start + longest
                elif timings[i - 1].word in SENTENCE_END_MARKS:
                    timings[i].start = timings[i].end - longest
    merge_punctuations(timings, options.prepend_punctuations, options.append_punctuations)

    out, k, last_speech = [], 0, window.last_speech
    for seg_tokens, (start, end) in zip(window.tokens, window.spans):
        n_text = sum(1 for t in seg_tokens if t < tok.eot)
        words, saved = [], 0
        while k < len(timings) and saved < n_text:
            t = timings[k]
            if t.word:
                words.append(Word(t.word, round(window.offset + t.start, 2), round(window.offset + t.end, 2),
                                  t.probability))
            saved += len(t.tokens)
            k += 1
        segment = TimedSegment(start, end, words)
        if words:
            _refine_bounds(segment, median, longest, last_speech)
            last_speech = segment.end
        out.append(segment)
    return out


def _refine_bounds(seg: TimedSegment, median: float, longest: float, last_speech: float) -> None:
    """Segment-boundary heuristics of openai-whisper, in place (times in seconds)."""
    words = seg.words
    first = words[0]
    # After a pause, the first word (and the second) may have absorbed the silence: cut them.
    if first.end - last_speech > median * 4 and (
            first.end - first.start > longest or (len(words) > 1 and words[1].end - first.start > longest * 2)):
        if len(words) > 1 and words[1].end - words[1].start > longest:
            boundary = max(words[1].end / 2, words[1].end - longest)
            first.end = words[1].start = boundary
        first.start = max(0, first.end - longest)
    # Prefer the segment's own start when the first word is too long, else start at the first word.
    if seg.start < first.end and seg.start - 0.5 > first.start:
        first.start = max(0, min(first.end - median, seg.start))
    else:
        seg.start = first.start
    last = words[-1]
    if seg.end > last.start and seg.end + 0.5 < last.end:
        last.end = max(last.start + median, seg.end)
    else:
        seg.end = last.end


__all__ = ["word_timestamps", "alignment_heads", "AlignmentOptions", "WindowText", "Word", "TimedSegment",
           "KNOWN_HEADS", "dtw", "median_filter", "split_to_word_tokens", "merge_punctuations"]
