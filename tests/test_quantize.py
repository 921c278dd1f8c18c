"""liteasr.quantize: the dynamic-int8 CPU copy of a model (dense and factored) against the float32 model."""

from __future__ import annotations

import copy

import pytest
import torch

from liteasr.model import LowRankLinear, set_module
from liteasr.quantize import FactoredLinear, int8_model


def test_factored_linear_is_the_same_function():
    torch.manual_seed(0)
    layer = LowRankLinear(64, 96, 12)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    x = torch.randn(3, 5, 64)
    assert torch.allclose(FactoredLinear(layer)(x), layer(x), rtol=1e-5, atol=1e-5)


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("factored", [False, True])
def test_int8_model_close_and_same_transcript(tiny_en, jfk, factored):
    """int8 weights (per channel) and int8 activations (per call): encoder output and logits within a few per cent
    of float32 (int8's 8 bits give ~0.4 % per element, a few layers of them a few per cent), and the JFK clip
    transcribed with the same words. The factored variant factors two linears of every encoder layer at
    half rank (the exact SVD truncation) so that the quantized FactoredLinear path is exercised."""
    model = copy.deepcopy(tiny_en)
    if factored:
        for layer in model.encoder.layers:
            for name in ("fc1", "fc2"):
                w, b = getattr(layer, name).weight.detach(), getattr(layer, name).bias.detach()
                u, s, vh = torch.linalg.svd(w.T, full_matrices=False)
                r = s.shape[0] // 2
                set_module(layer, name, LowRankLinear.from_factors((u[:, :r] * s[:r]).contiguous(),
                                                                   vh[:r].contiguous(), b.clone()))
    q = int8_model(model)
    assert any(type(m).__name__ == "Linear" and "quantized" in type(m).__module__ for m in q.modules())
    assert not any(isinstance(m, LowRankLinear) for m in q.modules())
    mel = torch.randn(1, model.dims.num_mel_bins, 3000) * 0.5
    with torch.inference_mode():
        feats, feats_q = model.encoder(mel), q.encoder(mel)
        assert _rel(feats_q, feats) < 0.08
        tokens = torch.tensor([[50257, 50362]])  # <|startoftranscript|> <|notimestamps|> of tiny.en
        lg, lg_q = model.decoder(tokens, model.decoder.new_cache(feats)), q.decoder(tokens, q.decoder.new_cache(feats))
        assert _rel(lg_q, lg) < 0.08
    ref, got = model.transcribe(jfk)["text"], q.transcribe(jfk)["text"]
    assert got.strip().lower() == ref.strip().lower()


def test_int8_model_rejects_cuda_models():
    class Fake(torch.nn.Module):
        def parameters(self):
            yield torch.empty(0, device="meta")
    with pytest.raises(ValueError, match="CPU"):
        int8_model(Fake())
