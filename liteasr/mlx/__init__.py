"""liteasr on MLX: any model liteasr loads, converted in memory, with factored layers kept factored.

    import liteasr.mlx
    model = liteasr.mlx.load_model("tiny.en")          # or a lite-whisper / `liteasr compress` directory
    print(model.transcribe("audio.flac")["text"])       # liteasr.transcribe's windows, seeking, segments

Checkpoints are read by `liteasr.checkpoint.load_model` (every format it knows) and the state dict is
handed to MLX by name; nothing is written to disk. The network runs in MLX; the per-step logit
rules (suppression, timestamp pairs) are liteasr.decoding's own functions applied to the (B, V)
float32 logits, so both backends follow one implementation of them.
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx
import numpy as np
import torch

from ..decoding import DecodingOptions, DecodingResult, beam_search, decode_features, greedy
from .model import LowRankLinear, Whisper

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_dtype() -> str:
    """float16 where MLX runs on a GPU (Metal, or CUDA), float32 on CPU, where half-precision
    matmuls are not faster and only add rounding error."""
    return "float16" if mx.default_device() == mx.gpu else "float32"


def load_model(name_or_path: str = "tiny.en", dtype: str | None = None) -> Whisper:
    """Load any model liteasr loads (dense Whisper, lite-whisper, CTranslate2, `liteasr compress` output) into MLX.

    dtype: "float32", "float16", "bfloat16" or None for `default_dtype()`. Weights are cast once,
    from the checkpoint's precision straight to `dtype`."""
    from ..checkpoint import load_model as load_torch

    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise ValueError(f"unknown MLX dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return from_torch(load_torch(name_or_path, "cpu", _TORCH_DTYPES[dtype]), dtype)


def from_torch(model, dtype: str | None = None) -> Whisper:
    """The MLX twin of a PyTorch `liteasr.model.Whisper`, with the same weights (and tokenizer).

    Names carry over one to one (strict load: a missing, extra or mis-shaped tensor raises); the
    only layout change is Conv1d's weight, (out, in, k) in PyTorch and (out, k, in) in MLX."""
    dt = DTYPES[dtype or default_dtype()]
    out = Whisper(model.dims, model.low_rank_config)
    weights = []
    for name, t in model.state_dict().items():
        a = mx.array(t.detach().cpu().float().numpy()).astype(dt)  # numpy has no bfloat16: go through float32
        weights.append((name, a.transpose(0, 2, 1) if a.ndim == 3 else a))  # conv weights only
    out.load_weights(weights, strict=True)
    mx.eval(out.parameters())
    out.tokenizer = model.tokenizer
    return out


def transcribe(model: Whisper, audio, **options) -> dict | list[dict]:
    """`liteasr.transcribe.transcribe` on an MLX model: same options, same outputs."""
    return model.transcribe(audio, **options)


# ---------------------------------------------------------------------------------------------------
# decoding: liteasr.decoding.decode with the network in MLX


def detect_language(model: Whisper, audio_features: mx.array, cache=None) -> tuple[list[str], torch.Tensor]:
    """Most likely language per window: audio_features (B, S, d) -> (codes, probs (B, n_languages))."""
    tok = model.tokenizer
    b = audio_features.shape[0]
    if not model.is_multilingual:
        return ["en"] * b, torch.ones(b, 1)
    # A cache of its own: the decode that follows writes its prompt from position 0 again.
    cache = cache.restart() if cache is not None else model.decoder.new_cache(audio_features)
    logits = model.decoder(mx.full((b, 1), tok.sot), cache)[:, -1]  # (B, V)
    codes, ids = list(tok.languages), mx.array(list(tok.languages.values()))
    probs = mx.softmax(logits[:, ids], axis=-1)  # (B, n_languages)
    return [codes[i] for i in mx.argmax(probs, axis=-1).tolist()], _to_torch(probs)


def decode(model: Whisper, mel: torch.Tensor, options: DecodingOptions | None = None,
           languages: list[str] | None = None, prompts: list[list[int]] | None = None) -> list[DecodingResult]:
    """Decode a batch of windows, mel (B, n_mels, 3000) from liteasr.audio -> one DecodingResult each.

    The MLX mirror of `liteasr.decoding.decode`: same prompts, language detection, token rules, searches (greedy,
    seeded sampling, beam search), temperature fallback, avg_logprob and no_speech_prob. Only the network runs
    in MLX; token selection is liteasr.decoding's, on the host."""
    options = options or DecodingOptions()
    x = mx.array(mel.transpose(1, 2).float().numpy()).astype(model.dtype)  # (B, 3000, n_mels): channels last
    audio_features = model.encoder(x)  # (B, 1500, d)
    languages = languages if languages is not None else [options.language] * x.shape[0]
    return decode_features(model, _MLXEngine(model, audio_features), options, languages, prompts,
                           lambda: detect_language(model, audio_features)[0])


class _MLXEngine:
    """liteasr.decoding's Engine with the network in MLX: a fresh cache per pass, reordered by mx.take for beams."""

    def __init__(self, model: Whisper, audio_features: mx.array) -> None:
        self.model, self.features = model, audio_features  # (B, S, d)
        self.cache = None

    def prefill(self, rows: list[int], repeat: int, tokens: torch.Tensor) -> torch.Tensor:
        idx = mx.array([i for i in rows for _ in range(repeat)])
        self.cache = self.model.decoder.new_cache(self.features[idx])
        return _to_torch(self.model.decoder(mx.array(tokens.numpy()), self.cache))  # (N, P, V) float32

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:  # (B, 1) -> (B, V)
        return _to_torch(self.model.decoder(mx.array(tokens.numpy()), self.cache, pos)[:, -1])

    def reorder(self, src: torch.Tensor, filled: int) -> None:
        idx = mx.array(src.numpy())
        c = self.cache
        c.self_k = [k[idx] for k in c.self_k]
        c.self_v = [v[idx] for v in c.self_v]

    def greedy(self, prompt_logits, prompt_len, rules, max_new, search):
        return greedy(prompt_logits, self.step, rules, prompt_len, max_new, search)

    def beam_search(self, prompt_logits, prompt_len, rules, max_new, search):
        return beam_search(prompt_logits, self.step, self.reorder, rules, prompt_len, max_new, search)


def _to_torch(a: mx.array) -> torch.Tensor:
    return torch.from_numpy(np.array(a, copy=True))  # evaluates `a`; a host copy (unified memory on Apple)


# ---------------------------------------------------------------------------------------------------
# timing


def encoder_latency(model: Whisper, batch_size: int = 1, repeats: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of one encoder call on `batch_size` random 30-s mel windows (cf. liteasr.bench).

    MLX is lazy: mx.eval forces each call to finish, so the host clock measures the work."""
    key = mx.random.key(0)
    mel = mx.random.normal((batch_size, 3000, model.dims.num_mel_bins), key=key).astype(model.dtype)
    for _ in range(warmup):
        mx.eval(model.encoder(mel))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(model.encoder(mel))
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


__all__ = ["load_model", "from_torch", "transcribe", "decode", "detect_language", "encoder_latency",
           "default_dtype", "Whisper", "LowRankLinear", "DTYPES"]
