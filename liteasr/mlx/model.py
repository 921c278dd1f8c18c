"""The MLX twin of liteasr/model.py: the same modules under the same names, so a PyTorch state dict
loads by name (mlx-examples' whisper port does the same for openai/whisper).

Two differences from the PyTorch file, both forced by MLX:
- Conv1d is channels-last: the encoder takes mel as (B, 2T, n_mels) and conv weights are
  (out, kernel, in); `liteasr.mlx.from_torch` transposes them, the only layout change.
- The decoder's self-attention cache grows by concatenation instead of being a static buffer:
  MLX arrays are values (there is no CUDA graph to keep shapes fixed for), and attending over the
  filled positions only is what the static cache's mask computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import mlx.core as mx
import mlx.nn as nn

from ..model import LOW_RANK_KEYS, Dims


class LowRankLinear(nn.Module):
    """y = (x @ weight1) @ weight2 + bias, with weight1 (in, r), weight2 (r, out): the lite-whisper layout."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight1 = mx.zeros((in_features, rank))
        self.weight2 = mx.zeros((rank, out_features))
        self.bias = mx.zeros((out_features,))

    def __call__(self, x: mx.array) -> mx.array:  # (..., in) -> (..., out)
        return mx.addmm(self.bias, x @ self.weight1, self.weight2)  # (..., r) intermediate


def _linear(d_in: int, d_out: int, rank: int | None, bias: bool = True) -> nn.Module:
    return nn.Linear(d_in, d_out, bias=bias) if rank is None else LowRankLinear(d_in, d_out, rank)


class Attention(nn.Module):
    """Multi-head attention through mx.fast.scaled_dot_product_attention (softmax in float32)."""

    def __init__(self, d: int, n_head: int, ranks: dict[str, int] | None = None) -> None:
        super().__init__()
        r = ranks or {}
        self.n_head = n_head
        self.q_proj = _linear(d, d, r.get("q_proj"))
        self.k_proj = _linear(d, d, r.get("k_proj"), bias=False)  # Whisper's keys carry no bias
        self.v_proj = _linear(d, d, r.get("v_proj"))
        self.out_proj = _linear(d, d, r.get("out_proj"))

    def heads(self, x: mx.array) -> mx.array:  # (B, T, d) -> (B, H, T, d_head)
        b, t, _ = x.shape
        return x.reshape(b, t, self.n_head, -1).transpose(0, 2, 1, 3)

    def __call__(self, x: mx.array, k: mx.array | None = None, v: mx.array | None = None,
                 mask: str | None = None) -> mx.array:
        """x (B, T, d); k, v (B, H, S, d_head) from the cache or cross-attention, or None for self-attention."""
        q = self.heads(self.q_proj(x))
        if k is None:
            k, v = self.heads(self.k_proj(x)), self.heads(self.v_proj(x))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)  # (B, H, T, d_head)
        b, _, t, _ = o.shape
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(b, t, -1))


class EncoderLayer(nn.Module):
    def __init__(self, d: int, n_head: int, d_ffn: int, ranks: dict[str, int] | None = None) -> None:
        super().__init__()
        r = ranks or {}
        self.self_attn = Attention(d, n_head, r)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = _linear(d, d_ffn, r.get("fc1"))
        self.fc2 = _linear(d_ffn, d, r.get("fc2"))
        self.final_layer_norm = nn.LayerNorm(d)

    def __call__(self, x: mx.array) -> mx.array:  # (B, T, d)
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(nn.gelu(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    def __init__(self, dims: Dims, low_rank: list[dict[str, int]] | None = None) -> None:
        super().__init__()
        d = dims.d_model
        ranks = low_rank or [{}] * dims.encoder_layers
        self.conv1 = nn.Conv1d(dims.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(dims.max_source_positions, d)
        self.layers = [EncoderLayer(d, dims.encoder_attention_heads, dims.encoder_ffn_dim, r) for r in ranks]
        self.layer_norm = nn.LayerNorm(d)

    def __call__(self, mel: mx.array) -> mx.array:
        """mel (B, 2T, n_mels), channels last -> audio features (B, T, d)."""
        x = nn.gelu(self.conv2(nn.gelu(self.conv1(mel))))  # (B, T, d)
        x = x + self.embed_positions.weight[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


@dataclass
class KVCache:
    """Decoding state of one batch: self-attention keys/values of the positions decoded so far
    (None before the first call), cross-attention keys/values computed once from the audio."""

    self_k: list[mx.array | None]  # per layer (B, H, t, d_head), t growing
    self_v: list[mx.array | None]
    cross_k: list[mx.array] = field(default_factory=list)  # per layer (B, H, S, d_head)
    cross_v: list[mx.array] = field(default_factory=list)

    def restart(self) -> "KVCache":
        """An empty self-attention cache over the same audio (shares the cross-attention keys/values)."""
        n = len(self.self_k)
        return replace(self, self_k=[None] * n, self_v=[None] * n)


class DecoderLayer(nn.Module):
    def __init__(self, d: int, n_head: int, d_ffn: int) -> None:
        super().__init__()
        self.self_attn = Attention(d, n_head)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = Attention(d, n_head)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d_ffn)
        self.fc2 = nn.Linear(d_ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def __call__(self, x: mx.array, cache: KVCache, i: int) -> mx.array:
        """x (B, T, d) following the cached positions; appends this step's keys/values to cache layer i."""
        attn = self.self_attn
        h = self.self_attn_layer_norm(x)
        k, v = attn.heads(attn.k_proj(h)), attn.heads(attn.v_proj(h))
        if cache.self_k[i] is not None:
            k = mx.concatenate([cache.self_k[i], k], axis=2)
            v = mx.concatenate([cache.self_v[i], v], axis=2)
        cache.self_k[i], cache.self_v[i] = k, v
        # "causal" aligns the last query with the last key, which is exactly the cache's layout.
        x = x + attn(h, k, v, "causal" if x.shape[1] > 1 else None)
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), cache.cross_k[i], cache.cross_v[i])
        return x + self.fc2(nn.gelu(self.fc1(self.final_layer_norm(x))))


class TextDecoder(nn.Module):
    def __init__(self, dims: Dims) -> None:
        super().__init__()
        d = dims.d_model
        self.embed_tokens = nn.Embedding(dims.vocab_size, d)
        self.embed_positions = nn.Embedding(dims.max_target_positions, d)
        self.layers = [DecoderLayer(d, dims.decoder_attention_heads, dims.decoder_ffn_dim)
                       for _ in range(dims.decoder_layers)]
        self.layer_norm = nn.LayerNorm(d)

    def new_cache(self, audio_features: mx.array) -> KVCache:
        """An empty self-attention cache and the cross keys/values of audio features (B, S, d)."""
        n = len(self.layers)
        cache = KVCache([None] * n, [None] * n)
        for layer in self.layers:
            a = layer.encoder_attn
            cache.cross_k.append(a.heads(a.k_proj(audio_features)))
            cache.cross_v.append(a.heads(a.v_proj(audio_features)))
        return cache

    def __call__(self, tokens: mx.array, cache: KVCache, offset: int = 0) -> mx.array:
        """tokens (B, T) at positions offset..offset+T-1 -> logits (B, T, vocab) in float32; `offset`
        is the number of positions already in the cache."""
        x = self.embed_tokens(tokens) + self.embed_positions.weight[offset: offset + tokens.shape[1]]
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i)
        x = self.layer_norm(x)
        return self.embed_tokens.as_linear(x).astype(mx.float32)  # output projection tied to the embedding


class Whisper(nn.Module):
    """Encoder-decoder Whisper on MLX; `low_rank` is the lite-whisper `low_rank_config` as in ../model.py.

    `liteasr.mlx.load_model` attaches `tokenizer`. `decode` and `transcribe` make it a drop-in for
    the PyTorch model in `liteasr.transcribe.transcribe`."""

    def __init__(self, dims: Dims, low_rank: list[dict[str, int]] | None = None) -> None:
        super().__init__()
        if low_rank is not None and len(low_rank) != dims.encoder_layers:
            raise ValueError(f"low_rank_config has {len(low_rank)} entries but the encoder has "
                             f"{dims.encoder_layers} layers")
        self.dims = dims
        self.encoder = AudioEncoder(dims, low_rank)
        self.decoder = TextDecoder(dims)
        self.tokenizer = None

    @property
    def low_rank_config(self) -> list[dict[str, int]]:
        """Per-layer ranks of the factored encoder linears (empty dicts for dense layers)."""
        out = []
        for layer in self.encoder.layers:
            a = layer.self_attn
            named = {"q_proj": a.q_proj, "k_proj": a.k_proj, "v_proj": a.v_proj, "out_proj": a.out_proj,
                     "fc1": layer.fc1, "fc2": layer.fc2}
            out.append({k: named[k].rank for k in LOW_RANK_KEYS if isinstance(named[k], LowRankLinear)})
        return out

    @property
    def is_multilingual(self) -> bool:
        return self.dims.vocab_size >= 51865

    @property
    def dtype(self) -> mx.Dtype:
        return self.encoder.conv1.weight.dtype

    def __call__(self, mel: mx.array, tokens: mx.array) -> mx.array:
        """Teacher-forced logits: mel (B, 3000, n_mels), tokens (B, T) -> (B, T, vocab)."""
        return self.decoder(tokens, self.decoder.new_cache(self.encoder(mel)))

    def decode(self, mel, options=None, languages: list[str] | None = None, prompts: list[list[int]] | None = None):
        """Decode a batch of windows, mel a torch (B, n_mels, 3000); see `liteasr.mlx.decode`."""
        from . import decode

        return decode(self, mel, options, languages, prompts)

    def transcribe(self, audio, **options):
        """Transcribe a file, an array, or a list of them; see `liteasr.transcribe.transcribe`."""
        from ..transcribe import transcribe

        return transcribe(self, audio, **options)
