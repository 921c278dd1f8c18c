"""liteasr.hf: lite-whisper directories as first-class transformers models.

After `import liteasr`, AutoConfig / AutoModel / AutoModelForSpeechSeq2Seq / pipeline() load lite-whisper
directories without trust_remote_code; the transformers model's logits equal liteasr's own on the same
weights; a checkpoint in exactly the published efficient-speech layout loads and transcribes through both;
the exported remote-code directory loads in a process where liteasr cannot be imported; checkpoints that
contradict their low_rank_config fail with errors naming the layer and tensor.

Runs under transformers 5.x (.venv, scripts/test.sh) and 4.57 (.venv-tf4, scripts/test-transformers4.sh).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (AutoConfig, AutoModel, AutoModelForSpeechSeq2Seq, GenerationConfig, WhisperProcessor,
                          pipeline)

import liteasr
from liteasr import hf
from liteasr.audio import log_mel_spectrogram, pad_or_trim
from liteasr.checkpoint import AUTO_MAP
from liteasr.cli import main as cli_main
from liteasr.model import LowRankLinear, encoder_linears, set_module

# fp32 logits of the same weights through two implementations that differ only in summation order
# (liteasr: SDPA + fused addmm; transformers: q pre-scaled, its own attention path). fp32 rounds at
# 6e-8 relative; growing like sqrt(n) over dot products of up to n = 1536 (fc2) and ~25 chained
# matmuls, a logit of magnitude ~30 moves by ~30 * 6e-8 * 40 * 25 ≈ 2e-3 at worst, by ~1e-5 typically
# (measured: tiny.en 1.2e-5, base 2e-5). 5e-4 is a tight bound that still never flakes.
LOGIT_ATOL = 5e-4
# Published-layout fixture (tiny.en, d 384, ffn 1536): layers 1 and 3 have no fc1/fc2 entry, like the
# published small models. Ranks keep enough of each weight for the JFK clip to transcribe correctly.
PUBLISHED_RANKS = [{"q_proj": 256, "k_proj": 256, "v_proj": 256, "out_proj": 256, "fc1": 320, "fc2": 320},
                   {"q_proj": 256, "k_proj": 256, "v_proj": 256, "out_proj": 256},
                   {"q_proj": 256, "k_proj": 256, "v_proj": 256, "out_proj": 256, "fc1": 320, "fc2": 320},
                   {"q_proj": 256, "k_proj": 192, "v_proj": 256, "out_proj": 256}]
BASE_RANKS = [{"q_proj": 128, "k_proj": 96, "v_proj": 192, "out_proj": 192, "fc1": 256, "fc2": 384}] * 6
JFK_PHRASE = "ask not what your country can do for you"


def _factor(layer: torch.nn.Module, rank: int) -> LowRankLinear:
    """Rank-r truncated SVD of a dense linear in the published layout (weight1 (in, r), weight2 (r, out)),
    from the eigenvectors of the smaller Gram matrix: deterministic and fast, unlike a full SVD."""
    w = layer.weight.detach().double()  # (out, in)
    if w.shape[0] <= w.shape[1]:
        u = torch.linalg.eigh(w @ w.T).eigenvectors[:, -rank:]  # top-r left singular vectors (out, r)
        w1, w2 = w.T @ u, u.T  # W ≈ U Uᵀ W
    else:
        v = torch.linalg.eigh(w.T @ w).eigenvectors[:, -rank:]  # top-r right singular vectors (in, r)
        w1, w2 = v, (w @ v).T  # W ≈ W V Vᵀ
    bias = layer.bias.detach().clone() if layer.bias is not None else torch.zeros(layer.out_features)
    return LowRankLinear.from_factors(w1.float().contiguous(), w2.float().contiguous(), bias)


def factored(model, ranks: list[dict[str, int]]):
    """A copy of `model` with the given encoder linears replaced by truncated-SVD factors: a valid lite model."""
    model = copy.deepcopy(model)
    linears = encoder_linears(model)
    for i, layer_ranks in enumerate(ranks):
        for key, rank in layer_ranks.items():
            name = f"encoder.layers.{i}.{'' if key.startswith('fc') else 'self_attn.'}{key}"
            set_module(model, name, _factor(linears[name], rank))
    assert model.low_rank_config == ranks
    return model.eval()


# The auto_map of the published efficient-speech checkpoints: two entries (liteasr writes a third).
PUBLISHED_AUTO_MAP = {"AutoConfig": "configuration_lite_whisper.LiteWhisperConfig",
                      "AutoModel": "modeling_lite_whisper.LiteWhisperForConditionalGeneration"}


def write_published(model, path: Path) -> Path:
    """`model` in exactly the layout of the published efficient-speech checkpoints: float32 safetensors,
    their config.json keys and two-entry auto_map, `begin_suppress_tokens: null`, no max_length."""
    liteasr.save(model, path, dtype=torch.float32)
    config = json.loads((path / "config.json").read_text())
    config.update(_name_or_path="efficient-speech/lite-whisper-tiny.en", transformers_version="4.46.3",
                  begin_suppress_tokens=None, auto_map=PUBLISHED_AUTO_MAP)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    gen = json.loads((path / "generation_config.json").read_text())
    gen.pop("max_length")
    gen["begin_suppress_tokens"] = None
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z' ]", " ", text.lower()).split())


# ---------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def lite_tiny(tiny_en):
    return factored(tiny_en, PUBLISHED_RANKS)


@pytest.fixture(scope="module")
def published_dir(lite_tiny, tmp_path_factory) -> Path:
    return write_published(lite_tiny, tmp_path_factory.mktemp("hf") / "lite-whisper-tiny.en")


@pytest.fixture(scope="module")
def hf_tiny_lite(published_dir):
    return AutoModelForSpeechSeq2Seq.from_pretrained(published_dir).eval()  # no trust_remote_code


@pytest.fixture(scope="module")
def jfk_mel(jfk) -> torch.Tensor:
    return log_mel_spectrogram(pad_or_trim(torch.from_numpy(jfk)))[None]  # (1, 80, 3000)


def _prompt(model) -> torch.Tensor:
    tok = model.tokenizer
    return torch.tensor([tok.sot_sequence("en", "transcribe", model.is_multilingual, False)
                         + tok.encode(" And so, my fellow Americans, ask not what your country can do for you")])


@torch.inference_mode()
def _logit_diff(ours, theirs, mel: torch.Tensor) -> float:
    tokens = _prompt(ours)
    a = ours(mel, tokens)
    b = theirs(input_features=mel, decoder_input_ids=tokens).logits
    diff = (a - b).abs().max().item()
    print(f"max |logit diff| {diff:.3g} (max |logit| {a.abs().max().item():.1f}, tolerance {LOGIT_ATOL})")
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    return diff


# ---------------------------------------------------------------------------------------------------
# construction and registration


def test_config_validation_names_layer_and_key():
    ok = hf.LiteWhisperConfig(encoder_layers=2, low_rank_config=[{"q_proj": 8}, {}])
    assert ok.low_rank_config == [{"q_proj": 8}, {}] and type(ok).model_type == "lite-whisper"
    assert ok.to_dict()["model_type"] == "lite-whisper"  # what config.json gets
    assert hf.LiteWhisperConfig(encoder_layers=3).low_rank_config == [{}, {}, {}]
    with pytest.raises(ValueError, match=r"low_rank_config has 1 entries, but the encoder has 2 layers"):
        hf.LiteWhisperConfig(encoder_layers=2, low_rank_config=[{}])
    with pytest.raises(ValueError, match=r"low_rank_config\[1\] \(encoder layer 1\) has unknown keys \['fc3'\]"):
        hf.LiteWhisperConfig(encoder_layers=2, low_rank_config=[{}, {"fc3": 4}])
    with pytest.raises(ValueError, match=r"low_rank_config\[0\] \(encoder layer 0\) has invalid ranks \{'fc1': 0\}"):
        hf.LiteWhisperConfig(encoder_layers=2, low_rank_config=[{"fc1": 0}, {}])


class _Allocations(TorchDispatchMode):
    """Counts the elements of every tensor allocated off the meta device."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith(("empty", "zeros", "ones", "full")) and out.device.type != "meta":
            self.numel += out.numel()
        return out


def test_construction_allocates_no_dense_factored_weight():
    ranks = [{"q_proj": 16, "k_proj": 16, "v_proj": 16, "out_proj": 16, "fc1": 32, "fc2": 32}, {"fc1": 32}]
    kw = dict(vocab_size=1000, d_model=256, encoder_layers=2, decoder_layers=1, encoder_ffn_dim=1024,
              decoder_ffn_dim=1024, encoder_attention_heads=4, decoder_attention_heads=4, max_source_positions=64,
              max_target_positions=32, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=1,
              begin_suppress_tokens=None)
    with _Allocations() as lite:
        model = hf.LiteWhisperForConditionalGeneration(hf.LiteWhisperConfig(low_rank_config=ranks, **kw))
    with _Allocations() as dense:
        transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**kw))
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    print(f"allocated elements: lite {lite.numel:,} (its parameters {params:,}), dense {dense.numel:,}")
    assert model.model.encoder.layers[0].fc2.weight2.shape == (32, 256)  # the published layout
    assert isinstance(model.model.encoder.layers[1].fc2, torch.nn.Linear)
    # Everything allocated is a parameter of the final model, except transformers' own untied proj_out
    # (vocab x d, built and then tied to the token embedding, dense or lite alike) and <= 1 % of small
    # init temporaries: no dense weight of a factored linear was allocated and thrown away.
    assert lite.numel - params <= 1000 * 256 + 0.01 * params
    assert lite.numel < dense.numel - 2 * 256 * 1024  # at least the two dense MLP weights of layer 0 were never built


def test_register_is_idempotent_and_auto_classes_resolve(published_dir):
    hf.register()
    hf.register()
    config = AutoConfig.from_pretrained(published_dir)
    assert type(config) is hf.LiteWhisperConfig and config.low_rank_config == PUBLISHED_RANKS
    model = AutoModel.from_pretrained(published_dir)  # maps to the generation model, as the published auto_map does
    assert type(model) is hf.LiteWhisperForConditionalGeneration
    assert isinstance(model.model.encoder.layers[0].self_attn.k_proj, hf.LowRankLinear)


@pytest.mark.parametrize("first", ["import liteasr; import transformers", "import liteasr.hf"])
def test_registration_whichever_is_imported_first(first, published_dir):
    """liteasr registers lazily, when transformers is first imported; importing liteasr.hf first (which
    imports transformers while it is half-initialised) must still register, and without a warning."""
    code = (f"import warnings; warnings.simplefilter('error'); {first}\n"
            f"from transformers import AutoConfig; print(type(AutoConfig.from_pretrained({str(published_dir)!r})).__name__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "LiteWhisperConfig", run.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------
# parity and the published layout


def test_logits_match_liteasr_tiny(lite_tiny, hf_tiny_lite, jfk_mel):
    assert _logit_diff(lite_tiny, hf_tiny_lite, jfk_mel) < LOGIT_ATOL


def test_logits_match_liteasr_base(base, jfk_mel, tmp_path):
    lite = factored(base, BASE_RANKS)
    path = liteasr.save(lite, tmp_path / "base-lite", dtype=torch.float32)
    theirs = AutoModelForSpeechSeq2Seq.from_pretrained(path).eval()
    assert _logit_diff(lite, theirs, jfk_mel) < LOGIT_ATOL


def test_published_layout_on_disk(published_dir):
    """The fixture really has the published layout (so the next tests test what they claim)."""
    config = json.loads((published_dir / "config.json").read_text())
    gen = json.loads((published_dir / "generation_config.json").read_text())
    assert config["model_type"] == "lite-whisper" and config["auto_map"] == PUBLISHED_AUTO_MAP
    assert config["begin_suppress_tokens"] is None and gen["begin_suppress_tokens"] is None
    assert "max_length" not in gen and "fc1" not in config["low_rank_config"][1]
    with safe_open(published_dir / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
        assert f.get_slice("model.encoder.layers.0.self_attn.q_proj.weight1").get_shape() == [384, 256]
        assert f.get_slice("model.encoder.layers.0.self_attn.q_proj.weight2").get_shape() == [256, 384]
        assert f.get_slice("model.encoder.layers.0.fc2.weight1").get_shape() == [1536, 320]
        assert f.get_slice("model.encoder.layers.0.self_attn.k_proj.bias").get_shape() == [384]
        assert f.get_slice("model.encoder.layers.1.fc1.weight").get_shape() == [1536, 384]


def test_published_layout_transcribes_through_both(published_dir, hf_tiny_lite, jfk):
    ours = liteasr.load_model(published_dir).transcribe(np.array(jfk))["text"]
    asr = pipeline("automatic-speech-recognition", model=str(published_dir))
    # The pipeline decodes with beam search (num_beams=5) by default, liteasr greedily: compare like with like.
    theirs = asr(np.array(jfk), generate_kwargs={"num_beams": 1})["text"]
    print(f"liteasr:      {ours!r}\ntransformers: {theirs!r}")
    assert JFK_PHRASE in _words(ours)
    assert _words(theirs) == _words(ours)
    gen = hf_tiny_lite.generation_config  # the gaps of the published files are filled from the Whisper family
    assert gen.max_length == 448 and list(gen.begin_suppress_tokens) == [220, 50256]


def test_generate_modes(hf_tiny_lite, published_dir, jfk, speech_dev, audio_cache):
    processor = WhisperProcessor.from_pretrained(published_dir)
    features = processor(np.array(jfk), sampling_rate=16000, return_tensors="pt").input_features
    greedy = hf_tiny_lite.generate(features)
    beam = hf_tiny_lite.generate(features, num_beams=2)
    stamped = hf_tiny_lite.generate(features, return_timestamps=True)
    texts = processor.batch_decode(torch.cat([greedy, beam]), skip_special_tokens=True)
    print(texts)
    assert all(JFK_PHRASE in _words(t) for t in texts)
    timestamp_begin = processor.tokenizer.convert_tokens_to_ids("<|0.00|>")
    assert (stamped >= timestamp_begin).sum() >= 2  # at least one segment's start and end
    # Why loading fills the published files' gaps: with them as published, generate() stops at 20 tokens.
    filled = hf_tiny_lite.generation_config
    try:
        hf_tiny_lite.generation_config = GenerationConfig.from_pretrained(published_dir)
        truncated = hf_tiny_lite.generate(features)
    finally:
        hf_tiny_lite.generation_config = filled
    print(f"as published: {truncated.shape[1]} tokens, filled: {greedy.shape[1]} tokens")
    assert truncated.shape[1] == 20 < greedy.shape[1]
    # Long-form through the pipeline's chunking: JFK, 2 s of silence, another clip (> 30 s in total).
    other = next(r for r in speech_dev if r["duration_s"] > 20 and r["id"].startswith("ls_other"))
    audio = np.concatenate([jfk, np.zeros(32000, np.float32), audio_cache(other["path"])])
    assert len(audio) > 30 * 16000
    asr = pipeline("automatic-speech-recognition", model=hf_tiny_lite, tokenizer=processor.tokenizer,
                   feature_extractor=processor.feature_extractor)
    text = _words(asr(audio, chunk_length_s=30, batch_size=2)["text"])
    print(text)
    assert JFK_PHRASE in text and " ".join(_words(other["text"]).split()[-3:]) in text


def test_save_pretrained_roundtrip(hf_tiny_lite, jfk_mel, tmp_path):
    hf_tiny_lite.save_pretrained(tmp_path / "resaved")
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert config["model_type"] == "lite-whisper" and config["low_rank_config"] == PUBLISHED_RANKS
    again = AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "resaved").eval()
    tokens = torch.tensor([[50257, 50362]])
    with torch.inference_mode():
        a = hf_tiny_lite(input_features=jfk_mel, decoder_input_ids=tokens).logits
        b = again(input_features=jfk_mel, decoder_input_ids=tokens).logits
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# export: remote code for transformers users without liteasr

_FRESH = textwrap.dedent("""
    import sys
    sys.modules["liteasr"] = None  # from here on, `import liteasr` raises ImportError
    try:
        import liteasr
        raise SystemExit("liteasr is importable")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForSpeechSeq2Seq
    model = AutoModelForSpeechSeq2Seq.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    inputs = torch.load(sys.argv[2])
    with torch.inference_mode():
        torch.save(model(input_features=inputs["mel"], decoder_input_ids=inputs["tokens"]).logits, sys.argv[3])
""")


def test_export_loads_without_liteasr(published_dir, lite_tiny, jfk_mel, tmp_path):
    out = tmp_path / "exported"
    cli_main(["export-hf", str(out), "--model", str(published_dir), "--save-dtype", "float32",
              "--base-model", "openai/whisper-tiny.en"])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "configuration_lite_whisper.py", "generation_config.json",
                     "model.safetensors", "modeling_lite_whisper.py", "preprocessor_config.json",
                     "tokenizer.json", "tokenizer_config.json"]
    for name in ("configuration_lite_whisper.py", "modeling_lite_whisper.py"):
        imports = re.findall(r"^\s*(?:from|import)\s+(\S+)", (out / name).read_text(), flags=re.M)
        assert {i.split(".")[0] for i in imports} <= {"__future__", "torch", "transformers", ""}, imports
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["low_rank_config"] == PUBLISHED_RANKS
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: openai/whisper-tiny.en\nlibrary_name: transformers\n")
    assert "pipeline_tag: automatic-speech-recognition" in card
    assert "| 1 | 256 | 256 | 256 | 256 | dense | dense |" in card

    tokens = _prompt(lite_tiny)
    torch.save({"mel": jfk_mel, "tokens": tokens}, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-I", "-c", _FRESH, str(out), str(tmp_path / "inputs.pt"),
                          str(tmp_path / "logits.pt")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = torch.load(tmp_path / "logits.pt")
    with torch.inference_mode():
        ours = lite_tiny(jfk_mel, tokens)
    diff = (ours - theirs).abs().max().item()
    print(f"remote code vs liteasr: max |logit diff| {diff:.3g}")
    assert diff < LOGIT_ATOL


def test_export_refuses_dense_and_existing(tiny_en, published_dir, tmp_path):
    with pytest.raises(ValueError, match="no factored layers"):
        hf.export(tiny_en, tmp_path / "dense")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        hf.export(published_dir, tmp_path / "taken")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left behind


# ---------------------------------------------------------------------------------------------------
# bad input


def _variant(src: Path, dst: Path, edit) -> Path:
    """`src` with an edited config.json (other files linked, not copied)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    edit(config["low_rank_config"])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda c: c[2].update(q_proj=200),
     r"model\.encoder\.layers\.2\.self_attn\.q_proj\.weight1: shape \(384, 200\) from config\.json, "
     r"(\(384, 256\)|another) in the checkpoint[\s\S]*low_rank_config\[2\] = "),
    (lambda c: c[0].pop("fc2"),  # lookaheads: both lines, in either order
     r"(?=[\s\S]*model\.encoder\.layers\.0\.fc2\.weight: missing from the checkpoint)"
     r"(?=[\s\S]*model\.encoder\.layers\.0\.fc2\.weight1: in the checkpoint, not in the model)"),
    (lambda c: c[1].update(fc1=64),
     r"(?=[\s\S]*model\.encoder\.layers\.1\.fc1\.weight: in the checkpoint, not in the model)"
     r"(?=[\s\S]*model\.encoder\.layers\.1\.fc1\.weight1: missing from the checkpoint)"),
    (lambda c: c.pop(), r"low_rank_config has 3 entries, but the encoder has 4 layers"),
    (lambda c: c[3].update(o_proj=8), r"low_rank_config\[3\] \(encoder layer 3\) has unknown keys \['o_proj'\]"),
], ids=["rank-vs-shape", "missing-entry", "extra-entry", "length", "unknown-key"])
def test_bad_low_rank_config_errors(published_dir, tmp_path, edit, message):
    bad = _variant(published_dir, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message):
        AutoModelForSpeechSeq2Seq.from_pretrained(bad)
