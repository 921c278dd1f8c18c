"""The whole Whisper model in one file: dims, factored linears, attention, encoder, decoder, KV cache.

Module and parameter names follow Hugging Face's `WhisperForConditionalGeneration` (minus its
`model.` prefix), so checkpoints in the transformers and lite-whisper layouts load without a
name table: `checkpoint.py` only adds or strips that prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Linear layers of an encoder block that LiteASR may factor (the lite-whisper `low_rank_config` keys).
LOW_RANK_KEYS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class Dims:
    """Shapes of one Whisper model (names as in transformers' WhisperConfig)."""

    num_mel_bins: int = 80  # 80, or 128 for large-v3 / turbo
    vocab_size: int = 51865  # 51864 for English-only models, 51866 for large-v3
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_layers: int = 4
    decoder_attention_heads: int = 6
    decoder_ffn_dim: int = 1536
    max_source_positions: int = 1500  # encoder frames per 30-s window
    max_target_positions: int = 448  # decoder context

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads


class LowRankLinear(nn.Module):
    """A factored linear layer: y = (x @ weight1) @ weight2 + bias.

    The storage is the published lite-whisper layout — weight1 (in_features, rank), weight2 (rank,
    out_features) — so checkpoints load without transposes. A factored layer always has a bias
    (the folded PCA mean), including Whisper's bias-free k_proj.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight1 = nn.Parameter(torch.empty(in_features, rank, **kw))
        self.weight2 = nn.Parameter(torch.empty(rank, out_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw))

    @classmethod
    def from_factors(cls, weight1: Tensor, weight2: Tensor, bias: Tensor) -> "LowRankLinear":
        """Wrap existing factors: weight1 (in, r), weight2 (r, out), bias (out,)."""
        layer = cls(weight1.shape[0], weight2.shape[1], weight1.shape[1], device="meta")
        layer.weight1 = nn.Parameter(weight1)
        layer.weight2 = nn.Parameter(weight2)
        layer.bias = nn.Parameter(bias)
        return layer

    @classmethod
    def from_pca(cls, layer: nn.Module, mean: Tensor, cov: Tensor, rank: int) -> "LowRankLinear":
        """LiteASR's factors of `layer` (nn.Linear or LowRankLinear) from the mean (out,) and covariance
        (out, out) of its outputs: weight1 = Wᵀ V_k (in, k), weight2 = V_kᵀ (k, out), bias = μ + V_k V_kᵀ (b − μ),
        with V_k the top-`rank` principal directions. Computed in float64, stored in the layer's dtype and device."""
        w, b = dense_weight(layer)
        dtype, device = w.dtype, w.device
        w = w.detach().to(cov.device, torch.float64)  # (out, in)
        b = b.detach().to(w) if b is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        v = vecs[:, -rank:].flip(1)  # (out, k): top-k principal directions
        bias = mean + v @ (v.T @ (b - mean))
        return cls.from_factors((w.T @ v).to(dtype), v.T.contiguous().to(dtype), bias.to(dtype)).to(device)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        h = x @ self.weight1  # (..., r): the cheap rank-r intermediate
        return torch.addmm(self.bias, h.reshape(-1, h.shape[-1]), self.weight2).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def dense_weight(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The (out, in) weight and bias that `layer` (dense or factored) computes, for analysis and tests."""
    if isinstance(layer, LowRankLinear):
        return (layer.weight1 @ layer.weight2).T, layer.bias
    return layer.weight, layer.bias


def _linear(d_in: int, d_out: int, rank: int | None, bias: bool = True) -> nn.Module:
    return nn.Linear(d_in, d_out, bias=bias) if rank is None else LowRankLinear(d_in, d_out, rank)


class Attention(nn.Module):
    """Multi-head attention through SDPA. `kv` is the key/value source for cross-attention."""

    def __init__(self, d: int, n_head: int, ranks: dict[str, int] | None = None) -> None:
        super().__init__()
        r = ranks or {}
        self.n_head = n_head
        self.q_proj = _linear(d, d, r.get("q_proj"))
        self.k_proj = _linear(d, d, r.get("k_proj"), bias=False)  # Whisper's keys carry no bias
        self.v_proj = _linear(d, d, r.get("v_proj"))
        self.out_proj = _linear(d, d, r.get("out_proj"))

    def heads(self, x: Tensor) -> Tensor:  # (B, T, d) -> (B, H, T, d_head)
        return x.unflatten(-1, (self.n_head, -1)).transpose(1, 2)

    def forward(self, x: Tensor, k: Tensor | None = None, v: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        """x (B, T, d); k, v (B, H, S, d_head) precomputed (cache or cross-attention) or None for self-attention."""
        q = self.heads(self.q_proj(x))
        if k is None:
            k, v = self.heads(self.k_proj(x)), self.heads(self.v_proj(x))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, d_head)
        return self.out_proj(o.transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    def __init__(self, d: int, n_head: int, d_ffn: int, ranks: dict[str, int] | None = None) -> None:
        super().__init__()
        r = ranks or {}
        self.self_attn = Attention(d, n_head, r)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = _linear(d, d_ffn, r.get("fc1"))
        self.fc2 = _linear(d_ffn, d, r.get("fc2"))
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d)
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    def __init__(self, dims: Dims, low_rank: list[dict[str, int]] | None = None) -> None:
        super().__init__()
        d = dims.d_model
        ranks = low_rank or [{}] * dims.encoder_layers
        self.conv1 = nn.Conv1d(dims.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(dims.max_source_positions, d)
        self.layers = nn.ModuleList(
            EncoderLayer(d, dims.encoder_attention_heads, dims.encoder_ffn_dim, r) for r in ranks)
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, 2T) -> audio features (B, T, d); T = 1500 for a 30-s window, fewer is allowed."""
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)  # (B, T, d)
        x = x + self.embed_positions.weight[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


@dataclass
class KVCache:
    """Static decoding state for one batch: self-attention keys/values filled position by position,
    cross-attention keys/values computed once from the audio features. Fixed shapes, so a decode
    step can be captured in a CUDA graph."""

    self_k: list[Tensor]  # per layer (B, H, n_ctx, d_head)
    self_v: list[Tensor]
    cross_k: list[Tensor] = field(default_factory=list)  # per layer (B, H, S, d_head)
    cross_v: list[Tensor] = field(default_factory=list)


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

    def forward(self, x: Tensor, cache: KVCache, i: int, pos: Tensor, mask: Tensor | None, n_keys: int) -> Tensor:
        """x (B, T, d) at positions pos (T,); writes this step's keys/values into cache layer i and
        attends to its first n_keys positions."""
        attn = self.self_attn
        h = self.self_attn_layer_norm(x)
        cache.self_k[i].index_copy_(2, pos, attn.heads(attn.k_proj(h)))
        cache.self_v[i].index_copy_(2, pos, attn.heads(attn.v_proj(h)))
        x = x + attn(h, cache.self_k[i][:, :, :n_keys], cache.self_v[i][:, :, :n_keys], mask)
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), cache.cross_k[i], cache.cross_v[i])
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class TextDecoder(nn.Module):
    def __init__(self, dims: Dims) -> None:
        super().__init__()
        d = dims.d_model
        self.embed_tokens = nn.Embedding(dims.vocab_size, d)
        self.embed_positions = nn.Embedding(dims.max_target_positions, d)
        self.layers = nn.ModuleList(
            DecoderLayer(d, dims.decoder_attention_heads, dims.decoder_ffn_dim) for _ in range(dims.decoder_layers))
        self.layer_norm = nn.LayerNorm(d)

    def new_cache(self, audio_features: Tensor) -> KVCache:
        """Allocate the self-attention cache and project the audio features (B, S, d) to cross keys/values."""
        b, n_ctx = audio_features.shape[0], self.embed_positions.num_embeddings
        first = self.layers[0].self_attn
        shape = (b, first.n_head, n_ctx, audio_features.shape[-1] // first.n_head)
        kw = dict(dtype=audio_features.dtype, device=audio_features.device)
        cache = KVCache([torch.zeros(shape, **kw) for _ in self.layers], [torch.zeros(shape, **kw) for _ in self.layers])
        for layer in self.layers:
            a = layer.encoder_attn
            cache.cross_k.append(a.heads(a.k_proj(audio_features)))
            cache.cross_v.append(a.heads(a.v_proj(audio_features)))
        return cache

    def forward(self, tokens: Tensor, cache: KVCache, offset: int | Tensor = 0) -> Tensor:
        """tokens (B, T) placed at positions offset..offset+T-1 -> logits (B, T, vocab), in float32."""
        t = tokens.shape[1]
        pos = torch.arange(t, device=tokens.device) + offset  # (T,)
        if isinstance(offset, int):
            # Eager: attend to the filled prefix only (a view of the cache, no copy). A single new
            # token sees the whole prefix, so it needs no mask; decode steps are memory-bound and
            # this skips reading the empty rest of the n_ctx = 448 slots.
            n_keys = offset + t
            mask = None if t == 1 else torch.arange(n_keys, device=tokens.device)[None, :] <= pos[:, None]
        else:
            # Tensor offset (a captured graph replays one shape): the whole static cache under a
            # causal mask; key j is visible to query i iff j <= pos[i].
            n_keys = self.embed_positions.num_embeddings
            mask = torch.arange(n_keys, device=tokens.device)[None, :] <= pos[:, None]  # (T, n_ctx)
        x = self.embed_tokens(tokens) + self.embed_positions(pos)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i, pos, mask, n_keys)
        return self.logits(self.layer_norm(x))

    def logits(self, x: Tensor) -> Tensor:
        """x (B, T, d) after the final LayerNorm -> logits (B, T, vocab) float32: the output projection, tied to
        the token embedding (quantized copies override this: liteasr.quantize)."""
        return (x @ self.embed_tokens.weight.T).float()


class Whisper(nn.Module):
    """Encoder-decoder Whisper. `low_rank` is the lite-whisper `low_rank_config`: one dict per encoder
    layer mapping any of LOW_RANK_KEYS to a rank; a missing key means that linear is dense.

    Loaders attach `tokenizer` (liteasr.tokenizer.Tokenizer), `config` (the Hugging Face config
    dict, kept so that saving writes back every field it was loaded with) and `generation_config`
    (e.g. the checkpoint's alignment heads, read by liteasr.alignment)."""

    def __init__(self, dims: Dims, low_rank: list[dict[str, int]] | None = None) -> None:
        super().__init__()
        if low_rank is not None and len(low_rank) != dims.encoder_layers:
            raise ValueError(f"low_rank_config has {len(low_rank)} entries but the encoder has "
                             f"{dims.encoder_layers} layers")
        self.generation_config: dict = {}
        self.dims = dims
        self.encoder = AudioEncoder(dims, low_rank)
        self.decoder = TextDecoder(dims)
        self.tokenizer = None
        self.config: dict = {}

    @property
    def low_rank_config(self) -> list[dict[str, int]]:
        """Current per-layer ranks of the factored encoder linears (empty dicts for dense layers)."""
        return [{name: m.rank for name, m in _encoder_linears(layer) if isinstance(m, LowRankLinear)}
                for layer in self.encoder.layers]

    @property
    def is_multilingual(self) -> bool:
        return self.dims.vocab_size >= 51865

    def forward(self, mel: Tensor, tokens: Tensor) -> Tensor:
        """Teacher-forced logits: mel (B, n_mels, 3000), tokens (B, T) -> (B, T, vocab)."""
        return self.decoder(tokens, self.decoder.new_cache(self.encoder(mel)))

    def transcribe(self, audio, **options):
        """Transcribe a file, an array, or a list of them; see `liteasr.transcribe.transcribe`."""
        from .transcribe import transcribe

        return transcribe(self, audio, **options)


def _encoder_linears(layer: EncoderLayer) -> list[tuple[str, nn.Module]]:
    a = layer.self_attn
    return [("q_proj", a.q_proj), ("k_proj", a.k_proj), ("v_proj", a.v_proj), ("out_proj", a.out_proj),
            ("fc1", layer.fc1), ("fc2", layer.fc2)]


def encoder_linears(model: Whisper) -> dict[str, nn.Module]:
    """Every compressible encoder linear by its state-dict name, e.g. 'encoder.layers.0.self_attn.q_proj'."""
    out = {}
    for i, layer in enumerate(model.encoder.layers):
        for name, module in _encoder_linears(layer):
            prefix = "self_attn." if name in ("q_proj", "k_proj", "v_proj", "out_proj") else ""
            out[f"encoder.layers.{i}.{prefix}{name}"] = module
    return out


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name` (the module swap used by compression)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
