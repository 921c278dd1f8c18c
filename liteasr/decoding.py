"""Decoding of 30-s windows: prompts, language detection, Whisper's token rules and the greedy loop.

The token rules (suppression, a blank or <|endoftext|> never first, timestamps in (start, end) pairs
that never go back in time) are written once, on tensors, in `select_tokens`: the eager reference
loop here, the CUDA-graph step of liteasr.cuda and the MLX backend all call it, so every backend
picks the same tokens by construction. Nothing in this module imports a runtime; runtimes import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import KVCache, Whisper
from .tokenizer import TIME_PRECISION, Tokenizer

NEG_INF = float("-inf")


@dataclass(frozen=True)
class DecodingOptions:
    """How one window is decoded (greedy)."""

    task: str = "transcribe"  # or "translate" (multilingual models only)
    language: str | None = None  # None: detect per window on multilingual models; "en" on English-only ones
    timestamps: bool = False  # emit <|t|> tokens (needed for segments and long-form seeking)
    max_new_tokens: int | None = None  # default: half the decoder context (224), as Whisper samples
    max_initial_timestamp: float = 1.0  # seconds; the first timestamp may not start later than this


@dataclass
class DecodingResult:
    tokens: list[int]  # generated tokens without the prompt and without <|endoftext|>
    text: str
    language: str
    avg_logprob: float
    no_speech_prob: float


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


def select_tokens(logits: Tensor, st: GreedyState, r: RuleTensors, first: bool) -> Tensor:
    """One greedy step: mask `logits` (B, V) float32 by the rules, take the argmax and record it. Returns (B,)."""
    apply_rules(logits, st, r, first)
    nxt = logits.argmax(-1)  # (B,)
    record(st, nxt, logits.log_softmax(-1).gather(1, nxt[:, None])[:, 0], r)
    return nxt


Step = Callable[[Tensor, int], Tensor]  # (tokens (B, 1), position) -> logits (B, V) float32


def greedy(prompt_logits: Tensor, step: Step, rules: TokenRules, prompt_len: int,
           max_new: int) -> tuple[list[list[int]], list[float]]:
    """The eager greedy loop: prompt_logits (B, V) float32 at the prompt's last position; step feeds one
    token per row. Returns per row the tokens up to and including the first <|endoftext|> (at most
    max_new) and their summed log-probability."""
    b, vocab = prompt_logits.shape
    r = RuleTensors(rules, vocab, prompt_logits.device)
    st = GreedyState(b, max_new, prompt_logits.device)
    st.reset(prompt_len)
    select_tokens(prompt_logits.clone(), st, r, first=True)
    for _ in range(1, max_new):
        if bool(st.done.all()):
            break
        select_tokens(step(st.tokens, int(st.offset)), st, r, first=False)
    return st.tokens_per_row(rules.eot), st.sum_logprob.tolist()


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


def prompt_batch(model, options: DecodingOptions, languages: list[str | None] | None, b: int,
                 detect: Callable[[], list[str]]) -> tuple[list[str], list[list[int]], int]:
    """Per-window languages (`detect()` fills the unknown ones on multilingual models), the prompt
    token lists (one length for every language) and how many tokens may follow them."""
    tok: Tokenizer = model.tokenizer
    languages = list(languages) if languages is not None else [options.language] * b
    if model.is_multilingual and any(lang is None for lang in languages):
        languages = [lang or det for lang, det in zip(languages, detect())]
    languages = [lang or "en" for lang in languages]
    prompts = [tok.sot_sequence(lang, options.task, model.is_multilingual, options.timestamps) for lang in languages]
    n_ctx = model.dims.max_target_positions
    return languages, prompts, min(options.max_new_tokens or n_ctx // 2, n_ctx - len(prompts[0]))


def make_result(generated: list[int], language: str, sum_logprob: float, no_speech_prob: float,
                tok: Tokenizer) -> DecodingResult:
    """A DecodingResult from one row's tokens (<|endoftext|> included when reached)."""
    n = len(generated)  # counts <|endoftext|> when it was reached, like Whisper's length normalisation
    tokens = generated[:-1] if generated and generated[-1] == tok.eot else generated
    return DecodingResult(tokens, tok.decode(tokens).strip(), language, sum_logprob / max(n, 1), no_speech_prob)


def no_speech_probs(sot_logits: Tensor, tok: Tokenizer) -> Tensor:
    """P(<|nospeech|>) right after <|startoftranscript|>: Whisper's voice-activity signal. (B, V) -> (B,)"""
    if tok.no_speech is None:
        return torch.zeros(sot_logits.shape[0])
    return sot_logits.softmax(-1)[:, tok.no_speech].float().cpu()


Loop = Callable[[Tensor, int, TokenRules, int], tuple[list[list[int]], list[float]]]


@torch.inference_mode()
def decode_features(model: Whisper, audio_features: Tensor, cache: KVCache, options: DecodingOptions,
                    languages: list[str | None] | None, loop: Loop) -> list[DecodingResult]:
    """Decode windows whose encoder output is audio_features (B, 1500, d), with `cache` holding their cross
    keys/values: prompt (run once, eagerly), language detection, no-speech probability, then `loop`
    (prompt logits (B, V), prompt length, rules, max new tokens) -> (tokens per row, summed log-probs)."""
    tok: Tokenizer = model.tokenizer
    languages, prompts, max_new = prompt_batch(model, options, languages, audio_features.shape[0],
                                               lambda: detect_language(model, audio_features, cache)[0])
    tokens = torch.tensor(prompts, device=audio_features.device)  # (B, P): same length for every language
    logits = model.decoder(tokens, cache)  # (B, P, V) float32
    no_speech = no_speech_probs(logits[:, 0], tok)
    rules = TokenRules.from_tokenizer(tok, options.timestamps, options.max_initial_timestamp)
    generated, sum_logprob = loop(logits[:, -1], tokens.shape[1], rules, max_new)
    return [make_result(g, lang, lp, nsp, tok) for g, lang, lp, nsp in
            zip(generated, languages, sum_logprob, no_speech.tolist())]


@torch.inference_mode()
def decode(model: Whisper, mel: Tensor, options: DecodingOptions = DecodingOptions(),
           languages: list[str | None] | None = None) -> list[DecodingResult]:
    """Greedy-decode a batch of windows through model.py's forward (the reference of every fast path):
    mel (B, n_mels, 3000) -> one DecodingResult per window, one eager decoder call per token.

    `languages` overrides options.language per window (e.g. a language detected once per file). For the
    fast CUDA path build a `liteasr.cuda.CudaRuntime` and pass it wherever a model is taken."""
    mel = mel.to(next(model.parameters()).dtype)
    audio_features = model.encoder(mel)  # (B, 1500, d)
    cache = model.decoder.new_cache(audio_features)

    def loop(prompt_logits: Tensor, prompt_len: int, rules: TokenRules, max_new: int):
        return greedy(prompt_logits, lambda t, pos: model.decoder(t, cache, pos)[:, -1], rules, prompt_len, max_new)

    return decode_features(model, audio_features, cache, options, languages, loop)
