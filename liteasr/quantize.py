"""Dynamic int8 for the CPU path: every linear of a model (dense or factored) as an int8 matmul.

`int8_model(model)` returns a copy in which every `nn.Linear`, both matmuls of every factored
`LowRankLinear` and the decoder's tied output projection run through PyTorch's maintained dynamic
quantization (`torch.ao.quantization.quantize_dynamic`): weights stored int8 with one scale per
output channel, activations quantized per call (fbgemm / onednn kernels). The copy is an ordinary
`Whisper` for every caller (`transcribe`, `eval`, `decode`); it runs on the CPU only.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .model import LowRankLinear, TextDecoder, Whisper, set_module


class FactoredLinear(nn.Sequential):
    """A LowRankLinear as two nn.Linear (in -> rank without bias, rank -> out with the bias), the form
    quantize_dynamic recognises. x (..., in) -> (..., out); the same function as the factored layer."""

    def __init__(self, layer: LowRankLinear) -> None:
        down = nn.Linear(layer.in_features, layer.rank, bias=False)
        up = nn.Linear(layer.rank, layer.out_features)
        with torch.no_grad():
            down.weight.copy_(layer.weight1.T)
            up.weight.copy_(layer.weight2.T)
            up.bias.copy_(layer.bias)
        super().__init__(down, up)


class ProjectedTextDecoder(TextDecoder):
    """A TextDecoder whose output projection is a module (`proj_out`, holding a copy of the tied embedding
    matrix) so that it can be quantized like every other linear."""

    def logits(self, x: Tensor) -> Tensor:  # (B, T, d) -> (B, T, V) float32
        return self.proj_out(x).float()


def int8_model(model: Whisper) -> Whisper:
    """A dynamic-int8 copy of `model` (CPU, float32 model in; `model` itself is unchanged).

    Every linear layer of the encoder and decoder, both matmuls of each factored encoder linear and the
    decoder's output projection become `torch.ao.nn.quantized.dynamic.Linear` with per-channel int8
    weights; convolutions, embeddings, LayerNorm and attention stay float32."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8_model: dynamic int8 runs on the CPU; move the model there first")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    q = copy.deepcopy(model).float()
    for name, m in list(q.named_modules()):
        if isinstance(m, LowRankLinear):
            set_module(q, name, FactoredLinear(m))
    dec = q.decoder
    dec.__class__ = ProjectedTextDecoder  # same state, plus a module for the output projection
    vocab, d = dec.embed_tokens.weight.shape
    dec.proj_out = nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        dec.proj_out.weight.copy_(dec.embed_tokens.weight)
    quantize_dynamic(q, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    q.tokenizer, q.config = model.tokenizer, model.config
    return q
