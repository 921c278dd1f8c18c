"""Recovery: distillation of the factored encoder toward the dense one, as compress() runs it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from liteasr.compress import CompressConfig, compress
from liteasr.compress.recover import distill


def test_recovery_keeps_published_format_and_never_worsens(tiny_en, speech_dev, tmp_path):
    from liteasr import load_model, save

    clips = [str(r["path"]) for r in speech_dev[3::20][:12]]
    refs = [r["text"] for r in speech_dev[3::20][:12]]
    model = copy.deepcopy(tiny_en)
    plan = compress(model, clips, CompressConfig(threshold="0.95", recover_steps=3, progress=False), refs=refs)
    report = plan.recovery
    print(report)
    assert report["steps"] == 3 and report["references"] == "manifest" and report["val_clips"] == 3
    assert report["val_wer_after"] <= report["val_wer_before"] or not report["kept"]
    assert all(not p.requires_grad for p in model.parameters())
    out = save(model, tmp_path / "rec", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lite-whisper"
    again = load_model(out)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_distill_refuses_a_dense_model(tiny_en, speech_dev):
    with pytest.raises(ValueError, match="compressed model"):
        distill(tiny_en, tiny_en, [str(speech_dev[0]["path"])], steps=1, progress=False)
