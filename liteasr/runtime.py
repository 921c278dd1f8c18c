"""GPU runtime: the same encoder rearranged for speed, and replayed from CUDA graphs.

What changes (modules are swapped; model.py's forward stays the reference):
- q/k/v become one projection: one (d, 3d) matmul for dense layers; for factored layers one
  (d, r_q + r_k + r_v) down-projection — the three thin matmuls that run at a fraction of the GPU's
  rate become one wider one — followed by the three small up-projections.
- biases ride in cuBLAS epilogues (addmm), attention is SDPA (flash) on (B, H, T, d_h).
- optionally `torch.compile` fuses LayerNorm / GELU / residual adds (compile=True);
- `EncoderRunner` captures one CUDA graph per batch size, so a call is one graph replay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import Attention, LowRankLinear, Whisper


class FusedQKV(nn.Module):
    """q, k, v of one attention block from a single down-projection. x (B, T, d) -> 3 × (B, T, d).

    Dense parts put their final outputs (with bias) in the shared matmul; factored parts put their
    rank-r intermediates there and add bias in the epilogue of their small up-projection."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        parts = (attn.q_proj, attn.k_proj, attn.v_proj)
        d = attn.out_proj.out_features if isinstance(attn.out_proj, LowRankLinear) else attn.out_proj.weight.shape[0]
        kw = dict(dtype=_dtype(attn.q_proj), device=_device(attn.q_proj))
        down, down_bias, self.splits, self.factored = [], [], [], []
        self.up, self.up_bias = nn.ParameterList(), nn.ParameterList()
        for m in parts:
            bias = m.bias.detach() if m.bias is not None else torch.zeros(d, **kw)
            if isinstance(m, LowRankLinear):
                down.append(m.weight1)
                down_bias.append(torch.zeros(m.rank, **kw))
                self.up.append(nn.Parameter(m.weight2.detach().contiguous(), requires_grad=False))
                self.up_bias.append(nn.Parameter(bias, requires_grad=False))
            else:
                down.append(m.weight.T)
                down_bias.append(bias)
            self.splits.append(down[-1].shape[1])
            self.factored.append(isinstance(m, LowRankLinear))
        self.down = nn.Parameter(torch.cat(down, 1).detach().contiguous(), requires_grad=False)  # (d, Σ r_i)
        self.down_bias = nn.Parameter(torch.cat(down_bias), requires_grad=False)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        h = torch.addmm(self.down_bias, x.flatten(0, 1), self.down).split(self.splits, dim=-1)  # (B·T, r_i)
        ups = iter(zip(self.up, self.up_bias))
        outs = []
        for part, factored in zip(h, self.factored):
            if factored:
                w, b = next(ups)
                part = torch.addmm(b, part, w)  # (B·T, d)
            outs.append(part.view(*x.shape[:2], -1))
        return tuple(outs)


def _dtype(m: nn.Module) -> torch.dtype:
    return next(m.parameters()).dtype


def _device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


class FastSelfAttention(nn.Module):
    """Encoder self-attention with fused q/k/v; same math as model.Attention (checked in tests)."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.n_head = attn.n_head
        self.qkv = FusedQKV(attn)
        self.out_proj = attn.out_proj

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d)
        q, k, v = (t.unflatten(-1, (self.n_head, -1)).transpose(1, 2) for t in self.qkv(x))  # (B, H, T, d_h)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).flatten(2))


@torch.no_grad()
def optimize_encoder(model: Whisper, compile: bool = False) -> Whisper:
    """Swap the encoder's attention blocks for FastSelfAttention, in place; optionally compile each layer."""
    for layer in model.encoder.layers:
        if isinstance(layer.self_attn, Attention):
            layer.self_attn = FastSelfAttention(layer.self_attn)
    if compile:
        import torch._dynamo

        # every layer with a distinct rank combination is its own specialisation
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        for layer in model.encoder.layers:
            layer.forward = torch.compile(layer.forward, dynamic=False)
    return model


class EncoderRunner:
    """Encoder calls replayed from one CUDA graph per batch size (captured on first use)."""

    def __init__(self, model: Whisper) -> None:
        self.model = model
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}

    @torch.inference_mode()
    def _capture(self, mel: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        static_in = mel.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as graph capture requires
            for _ in range(2):
                self.model.encoder(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.model.encoder(static_in)
        return graph, static_in, static_out

    @torch.inference_mode()
    def __call__(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, 3000) on the model's CUDA device -> audio features (B, 1500, d)."""
        b = mel.shape[0]
        if b not in self.graphs:
            self.graphs[b] = self._capture(mel)
        graph, static_in, static_out = self.graphs[b]
        static_in.copy_(mel)
        graph.replay()
        return static_out
