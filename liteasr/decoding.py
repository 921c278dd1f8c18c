"""Batched greedy decoding of 30-s windows: language detection, token suppression, timestamp rules.

One call decodes a batch of mel windows with a static KV cache. The logit rules are Whisper's:
non-speech and control tokens are suppressed everywhere, a blank or <|endoftext|> cannot start
the text, and with timestamps the tokens must form (start, text…, end) pairs that never go back
in time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import Whisper
from .tokenizer import TIME_PRECISION, Tokenizer


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


@torch.inference_mode()
def detect_language(model: Whisper, audio_features: Tensor, cache=None) -> tuple[list[str], Tensor]:
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


def decode(model: Whisper, mel: Tensor, options: DecodingOptions = DecodingOptions(),
           languages: list[str] | None = None) -> list[DecodingResult]:
    """Greedy-decode a batch of windows: mel (B, n_mels, 3000) -> one DecodingResult per window.

    `languages` overrides options.language per window (e.g. a language detected once per file).
    On a CUDA model this runs liteasr.runtime's fast path (fused encoder and a CUDA-graph decode step,
    same token rules); LITEASR_RUNTIME=eager selects `decode_reference` everywhere."""
    if next(model.parameters()).is_cuda:
        from .runtime import fast_decode, fast_path_disabled

        if fast_path_disabled() is None:
            return fast_decode(model, mel, options, languages)
    return decode_reference(model, mel, options, languages)


@torch.inference_mode()
def decode_reference(model: Whisper, mel: Tensor, options: DecodingOptions = DecodingOptions(),
                     languages: list[str] | None = None) -> list[DecodingResult]:
    """`decode` through model.py's forward, one eager decoder call per token: the reference of every fast path."""
    tok: Tokenizer = model.tokenizer
    mel = mel.to(next(model.parameters()).dtype)
    audio_features = model.encoder(mel)  # (B, 1500, d)
    cache = model.decoder.new_cache(audio_features)
    languages, prompts, max_new = prompt_batch(model, options, languages, mel.shape[0],
                                               lambda: detect_language(model, audio_features, cache)[0])
    tokens = torch.tensor(prompts, device=mel.device)  # (B, P): same length for every language
    logits = model.decoder(tokens, cache)  # (B, P, V) float32
    no_speech_prob = _no_speech_prob(logits[:, 0], tok)
    generated, sum_logprob = greedy(
        logits[:, -1], lambda next_tokens, i: model.decoder(next_tokens[:, None], cache, tokens.shape[1] + i)[:, -1],
        tok, options, max_new)
    return [_result(g, lang, lp, nsp, tok) for g, lang, lp, nsp in
            zip(generated, languages, sum_logprob.tolist(), no_speech_prob.tolist())]


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


def greedy(logits: Tensor, step: Callable[[Tensor, int], Tensor], tok: Tokenizer, options: DecodingOptions,
           max_new: int) -> tuple[list[list[int]], Tensor]:
    """The greedy token loop with Whisper's logit rules, shared by every backend.

    logits (B, V) float32: the predictions after the prompt; step(next_tokens (B,), i) -> the logits
    (B, V) after feeding token i of the continuation. Returns (tokens per window, <|endoftext|>
    included when reached; summed log-probabilities (B,) on the host)."""
    b = logits.shape[0]
    generated: list[list[int]] = [[] for _ in range(b)]
    sum_logprob = torch.zeros(b)
    done = torch.zeros(b, dtype=torch.bool)
    suppress = torch.tensor(tok.suppress_tokens, device=logits.device, dtype=torch.long)
    begin_suppress = torch.tensor([tok.encode(" ")[0], tok.eot], device=logits.device)
    max_initial = round(options.max_initial_timestamp / TIME_PRECISION)
    for i in range(max_new):
        logits[:, suppress] = -float("inf")
        if i == 0:
            logits[:, begin_suppress] = -float("inf")
        if options.timestamps:
            _timestamp_rules(logits, generated, tok, first=i == 0, max_initial=max_initial)
        next_tokens = logits.argmax(-1)  # (B,)
        logprobs = logits.log_softmax(-1).gather(1, next_tokens[:, None])[:, 0].cpu()
        sum_logprob += torch.where(done, 0.0, logprobs)
        for j, t in enumerate(next_tokens.tolist()):
            if not done[j]:
                generated[j].append(t)
        done |= (next_tokens == tok.eot).cpu()
        if bool(done.all()):
            break
        logits = step(next_tokens, i)
    return generated, sum_logprob


def _result(generated: list[int], language: str, sum_logprob: float, no_speech_prob: float,
            tok: Tokenizer) -> DecodingResult:
    n = len(generated)  # counts <|endoftext|> when it was reached, like Whisper's length normalisation
    tokens = generated[:-1] if generated and generated[-1] == tok.eot else generated
    return DecodingResult(tokens, tok.decode(tokens).strip(), language, sum_logprob / max(n, 1), no_speech_prob)


def _no_speech_prob(sot_logits: Tensor, tok: Tokenizer) -> Tensor:
    """P(<|nospeech|>) right after <|startoftranscript|>: Whisper's voice-activity signal. (B, V) -> (B,)"""
    if tok.no_speech is None:
        return torch.zeros(sot_logits.shape[0])
    return sot_logits.softmax(-1)[:, tok.no_speech].float().cpu()


def _timestamp_rules(logits: Tensor, generated: list[list[int]], tok: Tokenizer, first: bool,
                     max_initial: int) -> None:
    """Mask logits (B, V) in place so timestamps come in non-decreasing (start, end) pairs."""
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
    # When the timestamps together are likelier than any single text token, emit a timestamp.
    logprobs = logits.float().log_softmax(-1)
    ts_mass = logprobs[:, ts0:].logsumexp(-1)
    text_best = logprobs[:, :ts0].max(-1).values
    logits[ts_mass > text_best, :ts0] = neg
