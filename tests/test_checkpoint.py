"""liteasr.save / load_model: bitwise round trips (dense and lite-whisper), the published lite-whisper
tensor layout, and clear errors for every kind of broken checkpoint directory."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import liteasr
from liteasr.audio import log_mel_spectrogram, pad_or_trim
from liteasr.checkpoint import AUTO_MAP
from liteasr.model import LowRankLinear, encoder_linears, set_module

# Factored layers of the lite test model: ranks 32 and 64 on a mix of attention and MLP linears;
# layer 2 stays dense (an empty dict, as in published configs of small models).
RANKS = [{"q_proj": 32, "k_proj": 64}, {"v_proj": 32, "fc1": 64}, {}, {"out_proj": 64, "fc2": 32}]
ST = "model.safetensors"


def _svd_factor(layer: torch.nn.Linear, rank: int) -> LowRankLinear:
    """Best rank-r factorisation of a dense layer in the lite-whisper layout (weight1 (in, r), weight2 (r, out))."""
    w = layer.weight.detach().double()  # (out, in); SVD in fp64 for an accurate reference
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    w1 = (vh[:rank].T * s[:rank]).float().contiguous()
    w2 = u[:, :rank].T.float().contiguous()
    bias = layer.bias.detach().clone() if layer.bias is not None else torch.zeros(w.shape[0])
    return LowRankLinear.from_factors(w1, w2, bias)


@pytest.fixture(scope="module")
def lite_model(tiny_en):
    model = copy.deepcopy(tiny_en)
    linears = encoder_linears(model)
    for i, ranks in enumerate(RANKS):
        for key, rank in ranks.items():
            name = f"encoder.layers.{i}.{'self_attn.' if key.endswith('proj') else ''}{key}"
            set_module(model, name, _svd_factor(linears[name], rank))
    assert model.low_rank_config == RANKS
    return model.eval()


@pytest.fixture(scope="module")
def dense_fp16_dir(tiny_en, tmp_path_factory) -> Path:
    return liteasr.save(tiny_en, tmp_path_factory.mktemp("ckpt") / "tiny-fp16", dtype=torch.float16)


@pytest.fixture(scope="module")
def lite_dir(lite_model, tmp_path_factory) -> Path:
    return liteasr.save(lite_model, tmp_path_factory.mktemp("ckpt") / "tiny-lite", dtype=torch.float32)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module | dict, dtype: torch.dtype | None = None) -> None:
    """Bitwise equal state dicts; `b` converted to `dtype` first if given (never in place)."""
    sa = a.state_dict()
    sb = {k: v.to(dtype) if dtype else v for k, v in (b if isinstance(b, dict) else b.state_dict()).items()}
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def mel(jfk) -> torch.Tensor:
    return log_mel_spectrogram(pad_or_trim(torch.from_numpy(jfk)))[None]


@torch.inference_mode()
def _outputs(model, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tok = model.tokenizer
    tokens = torch.tensor([tok.sot_sequence("en", "transcribe", model.is_multilingual, False)
                           + tok.encode(" And so my fellow Americans")])
    features = model.encoder(mel.to(next(model.parameters()).dtype))
    return features, model.decoder(tokens, model.decoder.new_cache(features))


# ---------------------------------------------------------------------------------------------------
# round trips


def test_dense_fp32_roundtrip_bitwise(tiny_en, hf_dir_tiny):
    config = json.loads((hf_dir_tiny / "config.json").read_text())
    assert config["model_type"] == "whisper" and "low_rank_config" not in config and "auto_map" not in config
    assert config["torch_dtype"] == "float32"
    with safe_open(hf_dir_tiny / ST, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    loaded = liteasr.load_model(hf_dir_tiny, dtype=torch.float32)
    assert loaded.dims == tiny_en.dims and loaded.low_rank_config == [{}] * 4
    _assert_same_state(loaded, tiny_en)
    assert loaded.tokenizer.suppress_tokens == tiny_en.tokenizer.suppress_tokens
    assert loaded.tokenizer.special == tiny_en.tokenizer.special


def test_dense_fp16_roundtrip_bitwise(tiny_en, dense_fp16_dir):
    with safe_open(dense_fp16_dir / ST, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert json.loads((dense_fp16_dir / "config.json").read_text())["torch_dtype"] == "float16"
    _assert_same_state(liteasr.load_model(dense_fp16_dir, dtype=torch.float16), tiny_en, torch.float16)
    # tiny.en's weights come from an fp16 CTranslate2 file, so fp16 storage loses nothing:
    _assert_same_state(liteasr.load_model(dense_fp16_dir, dtype=torch.float32), tiny_en)


def test_lite_roundtrip(lite_model, lite_dir, mel):
    config = json.loads((lite_dir / "config.json").read_text())
    assert config["model_type"] == "lite-whisper"
    assert config["architectures"] == ["LiteWhisperForConditionalGeneration"]
    assert config["auto_map"] == AUTO_MAP
    assert config["low_rank_config"] == RANKS
    assert config["encoder_layers"] == 4 and config["d_model"] == 384  # the base model's WhisperConfig fields stay

    loaded = liteasr.load_model(lite_dir, dtype=torch.float32)
    assert loaded.low_rank_config == RANKS
    for name, module in encoder_linears(loaded).items():
        assert isinstance(module, LowRankLinear) == isinstance(encoder_linears(lite_model)[name], LowRankLinear)
    _assert_same_state(loaded, lite_model)
    # Same weights, same ops, same process: bitwise identical outputs.
    for before, after in zip(_outputs(lite_model, mel), _outputs(loaded, mel)):
        assert torch.equal(before, after)


def test_lite_safetensors_layout(tiny_en, lite_dir):
    """The exact published lite-whisper tensor layout (docs/checkpoint-format.md)."""
    with safe_open(lite_dir / ST, "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        tensors = {k: f.get_tensor(k) for k in f.keys() if ".layers.0.self_attn.q_proj." in k}
    p = "model.encoder.layers.0.self_attn"
    assert shapes[f"{p}.q_proj.weight1"] == (384, 32)  # (in_features, rank)
    assert shapes[f"{p}.q_proj.weight2"] == (32, 384)  # (rank, out_features)
    assert shapes[f"{p}.q_proj.bias"] == (384,)
    assert shapes[f"{p}.k_proj.weight1"] == (384, 64) and shapes[f"{p}.k_proj.weight2"] == (64, 384)
    assert shapes[f"{p}.k_proj.bias"] == (384,)  # factored k_proj carries a bias
    assert f"{p}.q_proj.weight" not in shapes and f"{p}.k_proj.weight" not in shapes
    assert shapes[f"{p}.v_proj.weight"] == (384, 384)  # dense linears keep nn.Linear's (out, in)
    assert shapes["model.encoder.layers.1.fc1.weight1"] == (384, 64)
    assert shapes["model.encoder.layers.1.fc1.weight2"] == (64, 1536)
    assert shapes["model.encoder.layers.3.fc2.weight1"] == (1536, 32)
    assert shapes["model.encoder.layers.3.fc2.weight2"] == (32, 384)
    assert shapes["model.encoder.layers.2.fc1.weight"] == (1536, 384)
    # Every other name is transformers' Whisper name.
    assert "model.encoder.conv1.weight" in shapes and "model.decoder.embed_tokens.weight" in shapes
    assert not [k for k in shapes if not k.startswith("model.")]
    n_factored = sum(len(r) for r in RANKS)
    assert sum(k.endswith(".weight1") for k in shapes) == sum(k.endswith(".weight2") for k in shapes) == n_factored
    # Orientation: weight1 @ weight2 is the TRANSPOSE of the (out, in) weight (the best rank-32 one).
    w = tiny_en.encoder.layers[0].self_attn.q_proj.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    w_r = (u[:, :32] * s[:32]) @ vh[:32]
    got = (tensors[f"{p}.q_proj.weight1"].double() @ tensors[f"{p}.q_proj.weight2"].double()).T
    diff = (got - w_r).abs().max().item()
    print(f"saved factors vs rank-32 SVD: max|diff| {diff:.1e} (|W| max {w.abs().max().item():.2f})")
    assert diff < 1e-5  # fp32 factors of an fp64 SVD: ~1e-7
    assert torch.equal(tensors[f"{p}.q_proj.bias"], tiny_en.encoder.layers[0].self_attn.q_proj.bias)


def test_save_refuses_to_overwrite_and_cleans_up(tiny_en, tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("previous")
    with pytest.raises(FileExistsError, match=str(target)):
        liteasr.save(tiny_en, target)
    assert (target / "old.txt").exists()

    import liteasr.checkpoint as ckpt

    def broken(model, out):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_processor_files", broken)
    with pytest.raises(OSError, match="disk full"):
        liteasr.save(tiny_en, target, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]  # the old one untouched

    liteasr.save(tiny_en, target, overwrite=True)
    assert not (target / "old.txt").exists() and (target / ST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------------
# broken checkpoints: each error names the file or tensor


def _clone(src: Path, dst: Path, link_weights: bool = True) -> Path:
    """Copy a checkpoint dir; the (large) weights file is symlinked unless the test rewrites it."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name == ST and link_weights:
            os.symlink(f, dst / ST)
        else:
            shutil.copy(f, dst / f.name)
    return dst


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path: Path, edit) -> None:
    state = load_file(path / ST)
    edit(state)
    save_file(state, path / ST, metadata={"format": "pt"})


def _load_error(path: Path, exc=ValueError) -> str:
    with pytest.raises(exc) as info:
        liteasr.load_model(path)
    print(info.value)
    return str(info.value)


def test_directory_without_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    msg = _load_error(tmp_path)
    assert str(tmp_path) in msg and "not a Whisper checkpoint" in msg


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\0" * 16)
    msg = _load_error(f)
    assert str(f) in msg and "not a model directory" in msg


def test_invalid_config_json(dense_fp16_dir, tmp_path):
    d = _clone(dense_fp16_dir, tmp_path / "m")
    (d / "config.json").write_text('{"model_type": "whisper", ')
    msg = _load_error(d)
    assert str(d / "config.json") in msg and "invalid JSON" in msg


def test_missing_tensor(dense_fp16_dir, tmp_path):
    d = _clone(dense_fp16_dir, tmp_path / "m", link_weights=False)
    _edit_tensors(d, lambda s: s.pop("model.encoder.layers.1.fc2.bias"))
    msg = _load_error(d)
    assert str(d) in msg and "lacks tensor model.encoder.layers.1.fc2.bias" in msg


def test_misshaped_tensor(dense_fp16_dir, tmp_path):
    d = _clone(dense_fp16_dir, tmp_path / "m", link_weights=False)

    def edit(s):
        s["model.decoder.layer_norm.weight"] = s["model.decoder.layer_norm.weight"][:383].clone()

    _edit_tensors(d, edit)
    msg = _load_error(d)
    assert "model.decoder.layer_norm.weight" in msg and "(383,)" in msg and "(384,)" in msg


def test_unexpected_tensor(dense_fp16_dir, tmp_path):
    d = _clone(dense_fp16_dir, tmp_path / "m", link_weights=False)
    _edit_tensors(d, lambda s: s.update({"model.encoder.extra.weight": torch.zeros(2)}))
    msg = _load_error(d)
    assert "model.encoder.extra.weight" in msg


def test_truncated_safetensors(dense_fp16_dir, tmp_path):
    d = _clone(dense_fp16_dir, tmp_path / "m", link_weights=False)
    data = (d / ST).read_bytes()
    (d / ST).write_bytes(data[: len(data) // 2])
    msg = _load_error(d)
    assert str(d / ST) in msg and "unreadable safetensors" in msg


def test_missing_weights_file(dense_fp16_dir, tmp_path):
    d = _clone(dense_fp16_dir, tmp_path / "m")
    (d / ST).unlink()
    msg = _load_error(d)
    assert str(d / ST) in msg


def test_low_rank_config_wrong_length(lite_dir, tmp_path):
    d = _clone(lite_dir, tmp_path / "m")
    _edit_config(d, low_rank_config=RANKS[:3])
    msg = _load_error(d)
    assert str(d) in msg and "low_rank_config has 3 entries" in msg and "4 layers" in msg


def test_low_rank_config_unknown_key(lite_dir, tmp_path):
    d = _clone(lite_dir, tmp_path / "m")
    _edit_config(d, low_rank_config=[{**RANKS[0], "gate_proj": 8}] + RANKS[1:])
    msg = _load_error(d)
    assert "low_rank_config[0]" in msg and "gate_proj" in msg


@pytest.mark.parametrize("rank", [0, -4, "32", 1.5])
def test_low_rank_config_invalid_rank(lite_dir, tmp_path, rank):
    d = _clone(lite_dir, tmp_path / "m")
    _edit_config(d, low_rank_config=[{**RANKS[0], "q_proj": rank}] + RANKS[1:])
    msg = _load_error(d)
    assert "low_rank_config[0]" in msg and "invalid ranks" in msg and "q_proj" in msg


def test_ranks_not_matching_weight1(lite_dir, tmp_path):
    d = _clone(lite_dir, tmp_path / "m")
    _edit_config(d, low_rank_config=[{**RANKS[0], "q_proj": 16}] + RANKS[1:])
    msg = _load_error(d)
    assert "model.encoder.layers.0.self_attn.q_proj.weight1" in msg
    assert "(384, 32)" in msg and "(384, 16)" in msg


def test_low_rank_config_names_a_dense_layer(lite_dir, tmp_path):
    d = _clone(lite_dir, tmp_path / "m")
    _edit_config(d, low_rank_config=RANKS[:2] + [{"fc1": 8}] + RANKS[3:])  # layer 2 is dense in the file
    msg = _load_error(d)
    assert "model.encoder.layers.2.fc1.weight1" in msg


def test_factored_tensors_without_low_rank_config(lite_dir, tmp_path):
    d = _clone(lite_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    del config["low_rank_config"]
    (d / "config.json").write_text(json.dumps(config))
    msg = _load_error(d)
    assert "model.encoder.layers." in msg and str(d) in msg
