"""Decoding of 30-s windows: prompts, language detection, Whisper's token rules, greedy / sampled / beam
search, and the temperature fallback.

The token rules (suppression, a blank or <|endoftext|> never first, timestamps in (start, end) pairs
that never go back in time) are written once, on tensors, in `apply_rules`; the per-step selections
(`select_tokens`: argmax or a seeded sample, `beam_select`: openai-whisper's beam update) are written
once on tensors too, with no host sync: the eager reference loop here, the CUDA-graph step of
liteasr.cuda and the MLX backend all call them, so every backend picks the same tokens by
construction. Nothing in this module imports a runtime; runtimes import it.

Semantics follow openai-whisper (`whisper/decoding.py`, `whisper/transcribe.py`): beam_size /
patience / length_penalty / best_of / temperature mean what they mean there, and `decode_with_fallback`
is its `decode_with_fallback`, batched: only the windows that fail are decoded again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import zlib
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .model import KVCache, Whisper
from .tokenizer import TIME_PRECISION, Tokenizer

NEG_INF = float("-inf")


@dataclass(frozen=True)
class DecodingOptions:
    """How one window is decoded. The search fields mean what they mean in openai-whisper's DecodingOptions and
    transcribe(): at temperature 0, beam search when beam_size is set, else greedy; above 0, best_of samples.
    A tuple of temperatures is the fallback schedule (`decode_with_fallback`)."""

    task: str = "transcribe"  # or "translate" (multilingual models only)
    language: str | None = None  # None: detect per window on multilingual models; "en" on English-only ones
    timestamps: bool = False  # emit <|t|> tokens (needed for segments and long-form seeking)
    max_new_tokens: int | None = None  # default: half the decoder context (224), as Whisper samples
    max_initial_timestamp: float = 1.0  # seconds; the first timestamp may not start later than this
    temperature: float | tuple[float, ...] = 0.0  # one temperature, or the schedule tried in order on failure
    best_of: int | None = None  # samples per window at temperature > 0 (the likeliest is kept); None: 1
    beam_size: int | None = None  # beams at temperature 0; None: greedy
    patience: float | None = None  # beam search stops once round(beam_size * patience) beams finished; None: 1
    length_penalty: float | None = None  # ranking score = logprob / ((5 + n) / 6) ** alpha; None: logprob / n
    compression_ratio_threshold: float | None = 2.4  # fallback when the text's gzip ratio is above this …
    logprob_threshold: float | None = -1.0  # … or its average log-probability below this …
    no_speech_threshold: float | None = 0.6  # … unless P(no speech) is above this and the log-prob is low (silence)
    prefix: str | None = None  # text forced at the start of every window's output (not part of the result)
    seed: int = 0  # sampling noise is a function of (seed, temperature, sample, step): results repeat

    def __post_init__(self) -> None:
        temps = self.temperatures
        if not temps or any(t < 0 for t in temps):
            raise ValueError(f"DecodingOptions.temperature: needs temperatures >= 0, got {self.temperature!r}")
        for name in ("best_of", "beam_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"DecodingOptions.{name} must be at least 1, got {value}")
        if self.patience is not None and (self.patience <= 0 or self.beam_size is None):
            raise ValueError("DecodingOptions.patience needs beam_size and must be positive")
        if self.length_penalty is not None and not 0 <= self.length_penalty <= 1:
            raise ValueError(f"DecodingOptions.length_penalty must be between 0 and 1, got {self.length_penalty}")

    @property
    def temperatures(self) -> tuple[float, ...]:
        t = self.temperature
        return tuple(float(x) for x in t) if isinstance(t, (tuple, list)) else (float(t),)


@dataclass
class DecodingResult:
    tokens: list[int]  # generated tokens without the prompt, the prefix and <|endoftext|>
    text: str
    language: str
    avg_logprob: float
    no_speech_prob: float
    temperature: float = 0.0
    compression_ratio: float = 0.0


def compression_ratio(text: str) -> float:
    """len(text) / len(gzip(text)) in UTF-8 bytes: about 1-2 for speech, high for repetition loops."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


# ---------------------------------------------------------------------------------------------------
# the token rules, once, on tensors


@dataclass(frozen=True)
class TokenRules:
    """The token ids Whisper's rules need.

    suppress: never selected; begin_suppress: not selected as the first token; timestamp_begin: None when the
    window is decoded without timestamps, else <|0.00|>'s id (then <|notimestamps|> is suppressed, timestamps
    come in (start, end) pairs that never go back, the first one at most max_initial steps in)."""

    suppress: tuple[int, ...]
    begin_suppress: tuple[int, ...]
    eot: int
    no_timestamps: int
    timestamp_begin: int | None = None
    max_initial: int = 50

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer, timestamps: bool, max_initial_timestamp: float = 1.0,
                       suppress_eot: bool = False) -> "TokenRules":
        """Rules for a liteasr Tokenizer. suppress_eot (benchmarks) forbids <|endoftext|> at every step, as
        transformers' min_new_tokens does, so that every window decodes the same number of tokens."""
        suppress = tuple(tok.suppress_tokens) + ((tok.eot,) if suppress_eot else ())
        return cls(suppress, (tok.encode(" ")[0], tok.eot), tok.eot, tok.no_timestamps,
                   tok.timestamp_begin if timestamps else None, round(max_initial_timestamp / TIME_PRECISION))


class RuleTensors:
    """TokenRules as tensors on one device: the index lists and the (V,) column index."""

    def __init__(self, rules: TokenRules, vocab: int, device: torch.device | str) -> None:
        self.rules = rules
        self.suppress = torch.tensor(rules.suppress, dtype=torch.long, device=device)
        self.begin_suppress = torch.tensor(rules.begin_suppress, dtype=torch.long, device=device)
        self.col = torch.arange(vocab, device=device)  # (V,)


class GreedyState:
    """Per-row decoding state in static buffers (fixed addresses, so a captured CUDA graph can update them).

    tokens (B, 1): the token fed to the next step, at position `offset` (0-dim); step (0-dim): index of the
    next token to select; history (B, max_steps); done (B,); sum_logprob (B,) float32; for the timestamp
    rules, per row: last and previous selected token, the latest timestamp token (-1: none) and the count."""

    def __init__(self, batch: int, max_steps: int, device: torch.device | str) -> None:
        kw = dict(dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch, 1, **kw)
        self.offset = torch.zeros((), **kw)
        self.step = torch.zeros((), **kw)
        self.history = torch.zeros(batch, max_steps, **kw)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.sum_logprob = torch.zeros(batch, dtype=torch.float32, device=device)
        self.last = torch.full((batch,), -1, **kw)
        self.prev = torch.full((batch,), -1, **kw)
        self.last_stamp = torch.full((batch,), -1, **kw)
        self.n_gen = torch.zeros(batch, **kw)

    def reset(self, prompt_len: int) -> None:
        self.offset.fill_(prompt_len - 1)  # select_tokens advances it to the first generated token's position
        self.step.zero_()
        self.done.zero_()
        self.sum_logprob.zero_()
        for t in (self.last, self.prev, self.last_stamp):
            t.fill_(-1)
        self.n_gen.zero_()

    def tokens_per_row(self, eot: int) -> list[list[int]]:
        """The selected tokens of each row up to and including its first <|endoftext|> (one host sync)."""
        history = self.history[:, : int(self.step)].tolist()
        return [row[: row.index(eot) + 1] if eot in row else row for row in history]


def apply_rules(logits: Tensor, st: GreedyState, r: RuleTensors, first: bool) -> None:
    """Mask `logits` (B, V) float32 in place by Whisper's rules, given each row's state. No host sync."""
    rules = r.rules
    logits.index_fill_(1, r.suppress, NEG_INF)
    if first:
        logits.index_fill_(1, r.begin_suppress, NEG_INF)
    ts0 = rules.timestamp_begin
    if ts0 is None:
        return
    col = r.col[None, :]  # (1, V)
    logits[:, rules.no_timestamps] = NEG_INF
    if first:  # a window starts with a timestamp, no later than max_initial
        logits.masked_fill_((col < ts0) | (col > ts0 + rules.max_initial), NEG_INF)
        return
    last_ts = (st.n_gen >= 1) & (st.last >= ts0)  # (B,)
    pen_ts = (st.n_gen < 2) | (st.prev >= ts0)
    # a pair just closed: text or <|endoftext|> comes next; a segment is open: close it (or end)
    closed, open_ = (last_ts & pen_ts)[:, None], (last_ts & ~pen_ts)[:, None]
    # never go back in time; an end may equal its own start
    floor = torch.where(last_ts & ~pen_ts, st.last_stamp, st.last_stamp + 1)[:, None]
    back = (st.last_stamp >= 0)[:, None] & (col >= ts0) & (col < floor)
    logits.masked_fill_((closed & (col >= ts0)) | (open_ & (col < rules.eot)) | back, NEG_INF)
    # when the timestamps together are likelier than any single text token, emit a timestamp
    logprobs = logits.log_softmax(-1)
    ts_mass = logprobs[:, ts0:].logsumexp(-1)
    text_best = logprobs[:, :ts0].max(-1).values
    logits.masked_fill_((ts_mass > text_best)[:, None] & (col < ts0), NEG_INF)


def record(st: GreedyState, nxt: Tensor, logprob: Tensor, r: RuleTensors) -> None:
    """Advance every unfinished row's state by its chosen token nxt (B,) of log-probability logprob (B,):
    history, sum, rule state, the finished flag, and the token fed to the next step. No host sync."""
    alive = ~st.done
    st.sum_logprob.add_(torch.where(alive, logprob, 0.0))
    st.history.index_copy_(1, st.step.view(1), nxt[:, None])
    if r.rules.timestamp_begin is not None:
        st.prev.copy_(torch.where(alive, st.last, st.prev))
        st.last_stamp.copy_(torch.where(alive & (nxt >= r.rules.timestamp_begin), nxt, st.last_stamp))
    st.last.copy_(torch.where(alive, nxt, st.last))
    st.n_gen.add_(alive.long())
    st.done.logical_or_(nxt == r.rules.eot)
    st.tokens.copy_(nxt[:, None])
    st.offset.add_(1)
    st.step.add_(1)


@dataclass(frozen=True)
class Search:
    """How tokens are chosen in one decoding pass: greedy (temperature 0, one row per window), `group` seeded
    samples per window (temperature > 0), or a beam search of `group` beams (beam=True, temperature 0)."""

    temperature: float = 0.0
    group: int = 1  # rows per window: samples or beams
    beam: bool = False
    patience: float = 1.0
    seed: int = 0

    @property
    def max_candidates(self) -> int:
        """Finished beams collected per window before its search stops (openai-whisper's max_candidates)."""
        return round(self.group * self.patience)


_M32 = 0xFFFFFFFF


def _mix(x):
    """A 32-bit integer hash (two xorshift-multiply rounds) of a Python int or an int64 tensor holding values
    < 2**32. The multipliers are below 2**31, so no product leaves int64: CPU and CUDA compute the same bits."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seed: int, temperature: float, sample: Tensor, step: Tensor, vocab: Tensor) -> Tensor:
    """Gumbel(0, 1) noise (N, V) float32 as a pure function of (seed, temperature, sample (N,), step (0-dim),
    token (V,)): argmax(logits / T + noise) is a sample of softmax(logits / T). Counter-based rather than a
    torch.Generator, so that it needs no generator state inside a CUDA graph, gives the same bits on every
    device, and does not depend on which other windows share the batch."""
    key = _mix((seed * 1_000_003 + round(temperature * 1000)) & _M32)  # a Python int: no tensor in a graph
    h = _mix((key ^ _mix(sample & _M32)) & _M32)  # (N,)
    h = _mix((h ^ _mix((step + 0x9E3779B) & _M32)) & _M32)  # (N,)
    h = _mix((h[:, None] ^ _mix(vocab[None, :] + 0x632BE5AB)) & _M32)  # (N, V)
    u = ((h >> 8).float() + 0.5) * 2.0 ** -24  # uniform in (0, 1), 24 bits
    return -torch.log(-torch.log(u))


def select_tokens(logits: Tensor, st: GreedyState, r: RuleTensors, first: bool,
                  search: Search = Search(), sample: Tensor | None = None) -> Tensor:
    """One greedy or sampling step: mask `logits` (B, V) float32 by the rules, take the argmax (temperature 0) or
    a seeded sample (row i is sample number sample[i] of its window), and record it. Returns (B,). The recorded
    log-probability is the untempered one, as in openai-whisper."""
    apply_rules(logits, st, r, first)
    logprobs = logits.log_softmax(-1)  # (B, V)
    if search.temperature > 0:
        noise = gumbel_noise(search.seed, search.temperature, sample, st.step, r.col)
        nxt = (logits / search.temperature + noise).argmax(-1)
    else:
        nxt = logits.argmax(-1)  # (B,)
    record(st, nxt, logprobs.gather(1, nxt[:, None])[:, 0], r)
    return nxt


class BeamState:
    """The finished hypotheses of a beam search over A windows (openai-whisper's `finished_sequences`), in static
    buffers: up to M = max_candidates per window in the order they finished, each with its tokens (before
    <|endoftext|>), length and score (summed log-probability, <|endoftext|>'s included). Slot M is a dump for
    the masked writes that keep every shape static."""

    def __init__(self, windows: int, beams: int, max_candidates: int, max_steps: int,
                 device: torch.device | str) -> None:
        self.beams, self.m = beams, max_candidates
        kw = dict(dtype=torch.long, device=device)
        self.tokens = torch.zeros(windows * (max_candidates + 1), max_steps, **kw)
        self.length = torch.zeros(windows * (max_candidates + 1), **kw)
        self.score = torch.zeros(windows * (max_candidates + 1), dtype=torch.float32, device=device)
        self.count = torch.zeros(windows, **kw)
        self.audio = torch.arange(windows, device=device)  # (A,)

    def reset(self) -> None:
        self.count.zero_()

    def finished(self) -> list[list[tuple[list[int], float]]]:
        """Per window, its finished hypotheses (tokens, score) in the order they finished (one host sync)."""
        m1 = self.m + 1
        count, length, score = self.count.tolist(), self.length.tolist(), self.score.tolist()
        rows = self.tokens.tolist()
        return [[(rows[a * m1 + j][: length[a * m1 + j]], score[a * m1 + j]) for j in range(min(count[a], self.m))]
                for a in range(len(count))]


def beam_select(logits: Tensor, st: GreedyState, bs: BeamState, r: RuleTensors, first: bool) -> Tensor:
    """One step of openai-whisper's BeamSearchDecoder.update on tensors, for rows = A windows × K beams (window-
    major), with no host sync: mask `logits` (A·K, V) by the rules, extend every beam by its K + 1 likeliest
    tokens, rank the candidates of each window, keep the K best that do not end, move the ending ones seen
    before them to the finished set, and reorder the per-row rule state with the beams. Returns the source row
    of each new beam (A·K,): the caller reorders its self-attention cache with it."""
    apply_rules(logits, st, r, first)
    k, m = bs.beams, bs.m
    n, a = logits.shape[0], logits.shape[0] // k
    logprobs = logits.log_softmax(-1)  # (A·K, V)
    top_lp, top_tok = logprobs.topk(k + 1, dim=-1)  # (A·K, K+1)
    scores = (st.sum_logprob[:, None] + top_lp).view(a, k * (k + 1))
    if first:  # every beam holds the same prompt: openai-whisper's dict keeps one copy of each candidate
        scores = scores.view(a, k, k + 1).clone()
        scores[:, 1:] = NEG_INF
        scores = scores.view(a, k * (k + 1))
    order = scores.argsort(dim=-1, descending=True, stable=True)  # ties keep openai-whisper's insertion order
    s_score = scores.gather(1, order)  # (A, C)
    s_tok = top_tok.view(a, -1).gather(1, order)
    s_src = order // (k + 1) + bs.audio[:, None] * k  # global source row
    ends = s_tok == r.rules.eot
    live_before = (~ends).long().cumsum(-1)  # non-ending candidates up to here
    keep = ~ends & (live_before <= k)  # exactly K per window
    seen_end = ends & (live_before < k)  # ending candidates ranked before the K-th kept one
    c = s_score.shape[1]
    pos = torch.arange(c, device=logits.device)
    kept = torch.where(keep, pos, pos + c).argsort(dim=-1)[:, :k]  # (A, K) positions of the kept, in rank order
    src = s_src.gather(1, kept).view(n)
    nxt = s_tok.gather(1, kept).view(n)
    new_score = s_score.gather(1, kept).view(n)
    # finished: slot = count + rank among this step's finished; beyond M -> the dump slot
    slot = bs.count[:, None] + seen_end.long().cumsum(-1) - 1  # (A, C)
    slot = torch.where(seen_end & (slot < m) & (bs.count[:, None] < m), slot, m)
    flat = (bs.audio[:, None] * (m + 1) + slot).view(-1)
    bs.tokens.index_copy_(0, flat, st.history.index_select(0, s_src.view(-1)))
    bs.length.index_copy_(0, flat, st.step.expand(flat.shape[0]).clone())
    bs.score.index_copy_(0, flat, s_score.view(-1))
    bs.count.add_(seen_end.long().sum(-1)).clamp_(max=m)
    # the per-row rule state follows its beam
    for t in (st.history, st.last, st.prev, st.last_stamp, st.n_gen):
        t.copy_(t.index_select(0, src))
    st.done.zero_()
    record(st, nxt, torch.zeros_like(new_score), r)
    st.sum_logprob.copy_(new_score)
    st.done.copy_((bs.count >= m)[:, None].expand(a, k).reshape(n))  # a window is done once M hypotheses finished
    return src


Step = Callable[[Tensor, int], Tensor]  # (tokens (B, 1), position) -> logits (B, V) float32
Reorder = Callable[[Tensor, int], None]  # (source row per row (B,), filled positions): reorder the cache


def greedy(prompt_logits: Tensor, step: Step, rules: TokenRules, prompt_len: int, max_new: int,
           search: Search = Search()) -> tuple[list[list[int]], list[float]]:
    """The eager greedy (or sampling) loop: prompt_logits (B, V) float32 at the prompt's last position; step feeds
    one token per row. Rows are `search.group` consecutive samples per window. Returns per row the tokens up to
    and including the first <|endoftext|> (at most max_new) and their summed log-probability."""
    b, vocab = prompt_logits.shape
    r = RuleTensors(rules, vocab, prompt_logits.device)
    st = GreedyState(b, max_new, prompt_logits.device)
    st.reset(prompt_len)
    sample = torch.arange(b, device=prompt_logits.device) % search.group
    select_tokens(prompt_logits.clone(), st, r, True, search, sample)
    for _ in range(1, max_new):
        if bool(st.done.all()):
            break
        select_tokens(step(st.tokens, int(st.offset)), st, r, False, search, sample)
    return st.tokens_per_row(rules.eot), st.sum_logprob.tolist()


def beam_search(prompt_logits: Tensor, step: Step, reorder: Reorder, rules: TokenRules, prompt_len: int,
                max_new: int, search: Search) -> list[list[tuple[list[int], float]]]:
    """The eager beam-search loop: rows = windows × search.group beams (window-major), prompt_logits (A·K, V) at
    the prompt's last position. Returns per window its hypotheses (tokens without <|endoftext|>, score)."""
    n, vocab = prompt_logits.shape
    device = prompt_logits.device
    r = RuleTensors(rules, vocab, device)
    st = GreedyState(n, max_new, device)
    bs = BeamState(n // search.group, search.group, search.max_candidates, max_new, device)
    st.reset(prompt_len)
    reorder(beam_select(prompt_logits.clone(), st, bs, r, first=True), int(st.offset))
    for _ in range(1, max_new):
        if bool(st.done.all()):
            break
        reorder(beam_select(step(st.tokens, int(st.offset)), st, bs, r, first=False), int(st.offset))
    return finish_beams(bs, st)


def finish_beams(bs: BeamState, st: GreedyState) -> list[list[tuple[list[int], float]]]:
    """openai-whisper's BeamSearchDecoder.finalize: windows with fewer than K finished hypotheses take their live
    beams, likeliest first, as if they ended now."""
    out = bs.finished()
    k, steps = bs.beams, int(st.step)
    history, sums = st.history[:, :steps].tolist(), st.sum_logprob.tolist()
    for a, hyps in enumerate(out):
        rows = sorted(range(a * k, (a + 1) * k), key=lambda i: sums[i], reverse=True)
        for i in rows:
            if len(hyps) >= k:
                break
            hyps.append((history[i], sums[i]))
    return out


def rank(hypotheses: list[tuple[list[int], float]], length_penalty: float | None) -> int:
    """openai-whisper's MaximumLikelihoodRanker: the index of the hypothesis of best score / length penalty."""
    def score(h: tuple[list[int], float]) -> float:
        n = len(h[0])
        return h[1] / (n if length_penalty is None else ((5 + n) / 6) ** length_penalty)

    scores = [score(h) for h in hypotheses]
    return scores.index(max(scores))


# ---------------------------------------------------------------------------------------------------
# prompts, language, results


@torch.inference_mode()
def detect_language(model: Whisper, audio_features: Tensor, cache: KVCache | None = None) -> tuple[list[str], Tensor]:
    """Most likely language per window from the logits after <|startoftranscript|>.

    audio_features (B, S, d) -> (codes, probs (B, n_languages)); English-only models return "en"."""
    tok: Tokenizer = model.tokenizer
    b = audio_features.shape[0]
    if not model.is_multilingual:
        return ["en"] * b, torch.ones(b, 1)
    cache = cache or model.decoder.new_cache(audio_features)
    sot = torch.full((b, 1), tok.sot, device=audio_features.device)
    logits = model.decoder(sot, cache)[:, -1]  # (B, V)
    codes, ids = list(tok.languages), torch.tensor(list(tok.languages.values()), device=logits.device)
    probs = logits[:, ids].softmax(-1)  # (B, n_languages)
    return [codes[i] for i in probs.argmax(-1).tolist()], probs.cpu()


def resolve_languages(model, options: DecodingOptions, languages: list[str | None] | None, b: int,
                      detect: Callable[[], list[str]]) -> list[str]:
    """Per-window languages: `languages` (or options.language), with `detect()` filling the unknown ones on
    multilingual models; "en" on English-only ones."""
    languages = list(languages) if languages is not None else [options.language] * b
    if model.is_multilingual and any(lang is None for lang in languages):
        languages = [lang or det for lang, det in zip(languages, detect())]
    return [lang or "en" for lang in languages]


def window_prompt(tok: Tokenizer, sot_sequence: list[int], prompt: Sequence[int], prefix: list[int],
                  n_ctx: int) -> tuple[list[int], int]:
    """openai-whisper's initial tokens of one window: [<|startofprev|> + the last n_ctx/2 - 1 prompt tokens] +
    the sot sequence + the prefix. Returns them and the index of <|startoftranscript|> (where P(no speech) is
    read)."""
    head = [tok.sot_prev, *list(prompt)[-(n_ctx // 2 - 1):]] if prompt else []
    return head + sot_sequence + prefix, len(head)


def search_for(options: DecodingOptions, temperature: float) -> Search:
    """openai-whisper's choice per temperature: beam search (if beam_size) at 0, best_of samples above 0."""
    if temperature > 0:
        return Search(temperature, options.best_of or 1, seed=options.seed)
    if options.beam_size is not None:  # no seed: deterministic searches share one CUDA graph across seeds
        return Search(0.0, options.beam_size, beam=True, patience=options.patience or 1.0)
    return Search(0.0)


def needs_fallback(r: DecodingResult, options: DecodingOptions) -> bool:
    """openai-whisper's test after each temperature: too repetitive or too unlikely, unless it is silence."""
    bad = ((options.compression_ratio_threshold is not None and r.compression_ratio > options.compression_ratio_threshold)
           or (options.logprob_threshold is not None and r.avg_logprob < options.logprob_threshold))
    silence = (options.no_speech_threshold is not None and r.no_speech_prob > options.no_speech_threshold
               and options.logprob_threshold is not None and r.avg_logprob < options.logprob_threshold)
    return bad and not silence


def decode_with_fallback(decode_at: Callable[[list[int], float], list[DecodingResult]], n: int,
                         options: DecodingOptions) -> list[DecodingResult]:
    """openai-whisper's temperature fallback over n windows, batched: decode all at the first temperature, then
    only those that `needs_fallback` at the next one, and so on. decode_at(window indices, temperature) ->
    their results. A window that fails at every temperature keeps its last result, as in openai-whisper."""
    results: list[DecodingResult | None] = [None] * n
    todo = list(range(n))
    for t in options.temperatures:
        for i, r in zip(todo, decode_at(todo, t)):
            results[i] = r
        todo = [i for i in todo if needs_fallback(results[i], options)]
        if not todo:
            break
    return results  # type: ignore[return-value]


class Engine(Protocol):
    """What decoding needs of a backend holding one batch of windows' audio features: run a prompt for some of
    them (each repeated `repeat` times: samples or beams) into a fresh cache, then one of the two searches."""

    def prefill(self, rows: list[int], repeat: int, tokens: Tensor) -> Tensor:
        """tokens (N = len(rows) · repeat, P) -> logits (N, P, V) float32, filling this pass's cache."""

    def greedy(self, prompt_logits: Tensor, prompt_len: int, rules: TokenRules, max_new: int,
               search: Search) -> tuple[list[list[int]], list[float]]: ...

    def beam_search(self, prompt_logits: Tensor, prompt_len: int, rules: TokenRules, max_new: int,
                    search: Search) -> list[list[tuple[list[int], float]]]: ...


class EagerEngine:
    """The reference backend: model.py's decoder, one eager call per step, its KVCache reordered by index_select."""

    def __init__(self, model: Whisper, audio_features: Tensor) -> None:
        self.model, self.features = model, audio_features  # (B, S, d)
        self.cache: KVCache | None = None

    def prefill(self, rows: list[int], repeat: int, tokens: Tensor) -> Tensor:
        idx = torch.tensor(rows, device=self.features.device).repeat_interleave(repeat)
        self.cache = self.model.decoder.new_cache(self.features[idx])
        return self.model.decoder(tokens.to(self.features.device), self.cache)

    def step(self, tokens: Tensor, pos: int) -> Tensor:
        return self.model.decoder(tokens, self.cache, pos)[:, -1]

    def reorder(self, src: Tensor, filled: int) -> None:
        for kv in (self.cache.self_k, self.cache.self_v):
            for t in kv:
                t[:, :, :filled] = t[:, :, :filled].index_select(0, src)

    def greedy(self, prompt_logits, prompt_len, rules, max_new, search):
        return greedy(prompt_logits, self.step, rules, prompt_len, max_new, search)

    def beam_search(self, prompt_logits, prompt_len, rules, max_new, search):
        return beam_search(prompt_logits, self.step, self.reorder, rules, prompt_len, max_new, search)


def decode_features(model, engine: Engine, options: DecodingOptions, languages: list[str | None] | None,
                    prompts: list[Sequence[int]] | None, detect: Callable[[], list[str]]) -> list[DecodingResult]:
    """Decode the B windows whose audio features `engine` holds, with the fallback of `options`: per window its
    prompt (the tokens of earlier text, may be empty) and language (None: `detect()`s). Windows whose initial
    tokens have equal length run as one batch; lengths differ only with prompts (see `decode_pass`)."""
    tok: Tokenizer = model.tokenizer
    b = len(prompts) if prompts is not None else len(languages) if languages is not None else None
    if b is None:
        raise ValueError("decode_features: give languages or prompts, one per window")
    languages = resolve_languages(model, options, languages, b, detect)
    prefix = tok.encode(" " + options.prefix.strip()) if options.prefix else []
    n_ctx = model.dims.max_target_positions
    initial = [window_prompt(tok, tok.sot_sequence(lang, options.task, model.is_multilingual, options.timestamps),
                             p, prefix, n_ctx) for lang, p in zip(languages, prompts or [()] * b)]
    rules = TokenRules.from_tokenizer(tok, options.timestamps, options.max_initial_timestamp)

    def decode_at(rows: list[int], temperature: float) -> list[DecodingResult]:
        out: dict[int, DecodingResult] = {}
        by_length: dict[int, list[int]] = {}
        for i in rows:
            by_length.setdefault(len(initial[i][0]), []).append(i)
        for group in by_length.values():
            for i, r in zip(group, decode_pass(model, engine, options, temperature, rules, group,
                                               [initial[i] for i in group], [languages[i] for i in group])):
                out[i] = r
        return [out[i] for i in rows]

    return decode_with_fallback(decode_at, b, options)


def decode_pass(model, engine: Engine, options: DecodingOptions, temperature: float, rules: TokenRules,
                rows: list[int], initial: list[tuple[list[int], int]],
                languages: list[str]) -> list[DecodingResult]:
    """One search at one temperature over windows `rows` whose initial tokens have one length.

    Windows with prompts of different lengths are decoded in separate passes rather than padded into one:
    Whisper's positions are absolute, so a left-padded prompt changes every logit unless each row gets its own
    positions and attention mask, which the static-shape CUDA step does not have. Within a file the prompt
    (the previous windows' text, capped at 223 tokens) reaches its cap after a window or two, so windows of
    long files again share one length, and files without prompts always do."""
    tok: Tokenizer = model.tokenizer
    search = search_for(options, temperature)
    g = search.group
    tokens = torch.tensor([t for t, _ in initial for _ in range(g)])  # (N, P)
    logits = engine.prefill(rows, g, tokens)  # (N, P, V) float32
    sot_index = initial[0][1]
    no_speech = no_speech_probs(logits[::g, sot_index], tok).tolist()
    p = tokens.shape[1]
    n_ctx = model.dims.max_target_positions
    max_new = min(options.max_new_tokens or n_ctx // 2, n_ctx - p + 1)  # openai-whisper stops past n_ctx tokens
    if search.beam:
        hyps = engine.beam_search(logits[:, -1], p, rules, max_new, search)
    else:
        gen, sums = engine.greedy(logits[:, -1], p, rules, max_new, search)
        hyps = [[(_strip_eot(gen[a * g + j], tok.eot), sums[a * g + j]) for j in range(g)] for a in range(len(rows))]
    results = []
    for a, h in enumerate(hyps):
        toks, sum_lp = h[rank(h, options.length_penalty)] if len(h) > 1 else h[0]
        text = tok.decode(toks).strip()
        results.append(DecodingResult(toks, text, languages[a], sum_lp / (len(toks) + 1), no_speech[a], temperature,
                                      compression_ratio(text)))
    return results


def _strip_eot(tokens: list[int], eot: int) -> list[int]:
    return tokens[: tokens.index(eot)] if eot in tokens else tokens


def no_speech_probs(sot_logits: Tensor, tok: Tokenizer) -> Tensor:
    """P(<|nospeech|>) right after <|startoftranscript|>: Whisper's voice-activity signal. (B, V) -> (B,)"""
    if tok.no_speech is None:
        return torch.zeros(sot_logits.shape[0])
    return sot_logits.softmax(-1)[:, tok.no_speech].float().cpu()


@torch.inference_mode()
def decode(model: Whisper, mel: Tensor, options: DecodingOptions = DecodingOptions(),
           languages: list[str | None] | None = None,
           prompts: list[Sequence[int]] | None = None) -> list[DecodingResult]:
    """Decode a batch of windows through model.py's forward (the reference of every fast path): mel (B, n_mels,
    3000) -> one DecodingResult per window, one eager decoder call per token, with the search and temperature
    fallback of `options`.

    `languages` overrides options.language per window (e.g. a language detected once per file); `prompts` gives
    per window the tokens of earlier text it is conditioned on (openai-whisper's `prompt`). For the fast CUDA
    path build a `liteasr.cuda.CudaRuntime` and pass it wherever a model is taken."""
    mel = mel.to(next(model.parameters()).dtype)
    audio_features = model.encoder(mel)  # (B, 1500, d)
    languages = languages if languages is not None else [options.language] * mel.shape[0]
    return decode_features(model, EagerEngine(model, audio_features), options, languages, prompts,
                           lambda: detect_language(model, audio_features)[0])
