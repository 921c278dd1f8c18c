"""Tests of the CTranslate2 Whisper reader (liteasr.ct2) on the real PyPI models and on
small synthetic model.bin files written here."""

from __future__ import annotations

import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from liteasr.ct2 import dequantize, is_ct2_dir, load_ct2, read_model, read_variables
from liteasr.fetch import fetch_model

TIED = "decoder/projection/weight"
SCALARS = {"activation", "alibi", "alignment_heads", "alignment_layer", "num_heads", "pre_norm",
           "scale_embeddings", "start_from_zero_embedding"}


@pytest.fixture(scope="session")
def models() -> dict[str, Path]:
    # Downloads ~210 MB into the default cache once; a failed download must fail the tests.
    return {"tiny.en": fetch_model("tiny.en", quiet=True), "base": fetch_model("base", quiet=True)}


# ---------------------------------------------------------------- a tiny CT2 writer

_DTYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2,
              np.dtype(np.int32): 3, np.dtype(np.float16): 4}


def _str(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_bytes(variables: dict[str, np.ndarray], aliases: dict[str, str],
              version: int = 6, spec: str = "WhisperSpec") -> bytes:
    out = [struct.pack("<I", version), _str(spec), struct.pack("<II", 3, len(variables))]
    for name, a in variables.items():
        out += [_str(name), struct.pack(f"<B{a.ndim}I", a.ndim, *a.shape),
                struct.pack("<BI", _DTYPE_IDS[a.dtype], a.nbytes), a.tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [_str(alias), _str(target)]
    return b"".join(out)


def write_ct2_dir(path: Path, variables: dict[str, np.ndarray], **kw) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.bin").write_bytes(ct2_bytes(variables, {TIED: "decoder/embeddings/weight"}, **kw))
    (path / "config.json").write_text("{}")
    return path


def synthetic_variables(d=8, heads=2, ffn=16, vocab=12, mels=4, src=6, tgt=5, seed=0):
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    v: dict[str, np.ndarray] = {
        "decoder/activation": np.array(3, np.int8), "decoder/alibi": np.array(0, np.int8),
        "decoder/alignment_heads": np.array(1, np.int16), "decoder/alignment_layer": np.array(-1, np.int16),
        "decoder/embeddings/weight": r(vocab, d), "decoder/num_heads": np.array(heads, np.int16),
        "decoder/position_encodings/encodings": r(tgt, d), "decoder/pre_norm": np.array(1, np.int8),
        "decoder/scale_embeddings": np.array(0, np.int8),
        "decoder/start_from_zero_embedding": np.array(0, np.int8),
        "encoder/conv1/weight": r(d, mels, 3), "encoder/conv1/bias": r(d),
        "encoder/conv2/weight": r(d, d, 3), "encoder/conv2/bias": r(d),
        "encoder/num_heads": np.array(heads, np.int16), "encoder/position_encodings/encodings": r(src, d),
    }
    for side in ("encoder", "decoder"):
        # Output rows of linear_0, linear_1, ...: fused qkv + out; cross-attention q, fused kv, out.
        blocks = [("self_attention", [3 * d, d])] + ([("attention", [d, 2 * d, d])] if side == "decoder" else [])
        for block, rows in blocks:
            p = f"{side}/layer_0/{block}"
            v[f"{p}/layer_norm/gamma"], v[f"{p}/layer_norm/beta"] = r(d), r(d)
            for i, n in enumerate(rows):
                v[f"{p}/linear_{i}/weight"], v[f"{p}/linear_{i}/bias"] = r(n, d), r(n)
            if block == "self_attention":
                v[f"{p}/linear_0/bias"][d:2 * d] = 0  # CT2 stores a zero key bias
            else:
                v[f"{p}/linear_1/bias"][:d] = 0
        p = f"{side}/layer_0/ffn"
        v[f"{p}/layer_norm/gamma"], v[f"{p}/layer_norm/beta"] = r(d), r(d)
        v[f"{p}/linear_0/weight"], v[f"{p}/linear_0/bias"] = r(ffn, d), r(ffn)
        v[f"{p}/linear_1/weight"], v[f"{p}/linear_1/bias"] = r(d, ffn), r(d)
        v[f"{side}/layer_norm/gamma"], v[f"{side}/layer_norm/beta"] = r(d), r(d)
    return v


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scale = (127.0 / absmax).astype(np.float32)
    q = np.clip(np.rint(w * scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
    return q, scale


# ---------------------------------------------------------------- independent mapping

def expected_hf(variables: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], set[str]]:
    """HF name -> source array, written out by hand, plus the CT2 names it used."""
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        used.add(name)
        return variables[name]

    exp: dict[str, np.ndarray] = {}

    def norm(hf: str, ct2: str) -> None:
        exp[f"{hf}.weight"], exp[f"{hf}.bias"] = take(f"{ct2}/gamma"), take(f"{ct2}/beta")

    def linear(hf: str, ct2: str, bias: bool = True) -> None:
        exp[f"{hf}.weight"] = take(f"{ct2}/weight")
        if bias:
            exp[f"{hf}.bias"] = take(f"{ct2}/bias")

    def fused(hfs: list[str], ct2: str) -> None:
        w, b = take(f"{ct2}/weight"), take(f"{ct2}/bias")
        n = w.shape[0] // len(hfs)
        for i, hf in enumerate(hfs):
            exp[f"{hf}.weight"] = w[i * n:(i + 1) * n]
            if hf.endswith("k_proj"):
                assert not b[i * n:(i + 1) * n].any(), f"{ct2}: key bias is not zero"
            else:
                exp[f"{hf}.bias"] = b[i * n:(i + 1) * n]

    for side in ("encoder", "decoder"):
        n_layers = len({k.split("/")[1] for k in variables if re.match(rf"{side}/layer_\d+/", k)})
        for i in range(n_layers):
            hf, ct2 = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
            fused([f"{hf}.self_attn.q_proj", f"{hf}.self_attn.k_proj", f"{hf}.self_attn.v_proj"],
                  f"{ct2}/self_attention/linear_0")
            linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
            if side == "decoder":
                norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
                linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
                fused([f"{hf}.encoder_attn.k_proj", f"{hf}.encoder_attn.v_proj"], f"{ct2}/attention/linear_1")
                linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
            norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
            linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        exp[f"model.{side}.embed_positions.weight"] = take(f"{side}/position_encodings/encodings")
    for c in ("conv1", "conv2"):
        linear(f"model.encoder.{c}", f"encoder/{c}")
    exp["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")
    used |= {k for k in variables if k.split("/")[-1] in SCALARS}
    return exp, used


def special_ids(model_dir: Path) -> dict[str, int]:
    vocab = (model_dir / "vocabulary.txt").read_text(encoding="utf-8").splitlines()
    eot, sot = vocab.index("<|endoftext|>"), vocab.index("<|startoftranscript|>")
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "decoder_start_token_id": sot}


# ---------------------------------------------------------------- real models

EXPECTED_ARCH = {
    "tiny.en": dict(vocab_size=51864, d_model=384, encoder_layers=4, decoder_layers=4,
                    encoder_attention_heads=6, decoder_attention_heads=6,
                    encoder_ffn_dim=1536, decoder_ffn_dim=1536),
    "base": dict(vocab_size=51865, d_model=512, encoder_layers=6, decoder_layers=6,
                 encoder_attention_heads=8, decoder_attention_heads=8,
                 encoder_ffn_dim=2048, decoder_ffn_dim=2048),
}


@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_exact_mapping(models, name):
    path = models[name]
    assert is_ct2_dir(path)
    variables, aliases = read_model(path)
    assert aliases == {TIED: "decoder/embeddings/weight"}
    exp, used = expected_hf(variables)
    assert used == set(variables), f"unaccounted CT2 variables: {set(variables) - used}"

    arch, sd, cfg = load_ct2(path)
    assert arch == {**EXPECTED_ARCH[name], "num_mel_bins": 80, "max_source_positions": 1500,
                    "max_target_positions": 448}
    assert "suppress_ids" in cfg and "alignment_heads" in cfg
    assert set(sd) == set(exp)
    for key, src in exp.items():
        t = sd[key]
        assert t.dtype == torch.float16 and src.dtype == np.float16, key
        assert tuple(t.shape) == src.shape, key
        # Bitwise: compare the raw 16-bit patterns, not values.
        assert np.array_equal(t.numpy().view(np.uint16), src.view(np.uint16)), key

    hf_keys = WhisperForConditionalGeneration(WhisperConfig(**arch, **special_ids(path))).state_dict()
    assert set(hf_keys) - set(sd) == {"proj_out.weight"}
    assert set(sd) <= set(hf_keys)
    assert all(tuple(hf_keys[k].shape) == tuple(sd[k].shape) for k in sd)
    n_tensors = sum(1 for a in variables.values() if a.ndim)
    # Each fused self-attention qkv gives 5 HF tensors (3 weights + q/v bias) instead of 2,
    # each fused cross-attention kv gives 3 instead of 2.
    layers = arch["encoder_layers"] + arch["decoder_layers"]
    assert len(sd) == n_tensors + 3 * layers + arch["decoder_layers"]
    if name == "tiny.en":
        assert (n_tensors, len(sd), len(hf_keys)) == (139, 167, 168)


def test_reader_roundtrip_bytes(models):
    # Writing the variables back must reproduce tiny.en's model.bin byte for byte.
    path = models["tiny.en"]
    variables, aliases = read_model(path)
    assert ct2_bytes(variables, aliases) == (path / "model.bin").read_bytes()
    assert list(read_variables(path)) == list(variables)


@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_load_into_transformers(models, name, tmp_path):
    arch, sd, _ = load_ct2(models[name])
    cfg = WhisperConfig(**arch, **special_ids(models[name]))
    model = WhisperForConditionalGeneration(cfg)
    result = model.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["proj_out.weight"]
    assert result.unexpected_keys == []
    model.tie_weights()
    assert torch.equal(model.proj_out.weight, sd["model.decoder.embed_tokens.weight"].float())
    if name == "tiny.en":
        assert cfg.decoder_start_token_id == 50257 and cfg.eos_token_id == 50256
        # Split tensors own their storage, so safetensors can save the dict as it is.
        from safetensors.torch import save_file
        save_file(sd, str(tmp_path / "m.safetensors"))
    else:
        assert cfg.decoder_start_token_id == 50258 and cfg.eos_token_id == 50257


# ---------------------------------------------------------------- synthetic models

def test_int8_dequantization(tmp_path):
    v = synthetic_variables()
    d = 8
    quantized = {}
    for name in ("encoder/layer_0/self_attention/linear_0/weight", "decoder/layer_0/attention/linear_1/weight",
                 "encoder/layer_0/ffn/linear_0/weight", "encoder/conv2/weight"):
        q, scale = quantize(v[name])
        quantized[name] = (v[name], q, scale)
        v[name], v[f"{name}_scale"] = q, scale
    arch, sd, cfg = load_ct2(write_ct2_dir(tmp_path / "m", v))
    assert cfg == {}
    assert arch == dict(vocab_size=12, num_mel_bins=4, d_model=8, encoder_layers=1, encoder_attention_heads=2,
                        decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
                        max_source_positions=6, max_target_positions=5)
    assert not any(k.endswith("_scale") for k in sd)

    def deq(name):
        _, q, scale = quantized[name]
        return q.astype(np.float32) / scale.reshape(-1, *[1] * (q.ndim - 1))

    qkv = deq("encoder/layer_0/self_attention/linear_0/weight")
    kv = deq("decoder/layer_0/attention/linear_1/weight")
    checks = {
        "model.encoder.layers.0.self_attn.q_proj.weight": qkv[:d],
        "model.encoder.layers.0.self_attn.k_proj.weight": qkv[d:2 * d],
        "model.encoder.layers.0.self_attn.v_proj.weight": qkv[2 * d:],
        "model.decoder.layers.0.encoder_attn.k_proj.weight": kv[:d],
        "model.decoder.layers.0.encoder_attn.v_proj.weight": kv[d:],
        "model.encoder.layers.0.fc1.weight": deq("encoder/layer_0/ffn/linear_0/weight"),
        "model.encoder.conv2.weight": deq("encoder/conv2/weight"),
    }
    for key, want in checks.items():
        assert sd[key].dtype == torch.float32
        assert np.array_equal(sd[key].numpy(), want), key
    for name, (orig, _, scale) in quantized.items():
        # The dequantised value is within half a quantisation step of the original.
        got = dequantize(quantized[name][1], scale).numpy()
        step = (1 / scale).reshape(-1, *[1] * (orig.ndim - 1))
        assert np.all(np.abs(got - orig) <= 0.5 * step + 1e-6)
    # Unquantised tensors keep their stored float32 values.
    assert np.array_equal(sd["model.encoder.layers.0.fc2.weight"].numpy(), v["encoder/layer_0/ffn/linear_1/weight"])

    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0, decoder_start_token_id=1)
    result = WhisperForConditionalGeneration(WhisperConfig(**arch, **ids)).load_state_dict(sd, strict=False)
    assert result.missing_keys == ["proj_out.weight"] and result.unexpected_keys == []


def test_dequantize_unit():
    q = np.array([[127, -64], [10, -127]], np.int8)
    scale = np.array([127.0, 12.7], np.float32)
    assert torch.allclose(dequantize(q, scale), torch.tensor([[1.0, -64 / 127], [10 / 12.7, -10.0]]))


def test_nonzero_key_bias_is_dropped(tmp_path):
    v = synthetic_variables()
    v["encoder/layer_0/self_attention/linear_0/bias"][8:16] = 1.0
    with pytest.warns(UserWarning, match="key bias"):
        _, sd, _ = load_ct2(write_ct2_dir(tmp_path / "m", v))
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in sd
    assert "model.encoder.layers.0.self_attn.q_proj.bias" in sd


def test_unsupported_scalar(tmp_path):
    v = synthetic_variables()
    v["decoder/activation"] = np.array(1, np.int8)  # tanh GELU: not Whisper
    with pytest.raises(ValueError, match="decoder/activation"):
        load_ct2(write_ct2_dir(tmp_path / "m", v))


def test_bad_header(tmp_path):
    v = synthetic_variables()
    d = write_ct2_dir(tmp_path / "v5", v, version=5)
    with pytest.raises(ValueError, match="model.bin") as e:
        read_variables(d)
    assert str(d) in str(e.value) and "version" in str(e.value)
    d = write_ct2_dir(tmp_path / "spec", v, spec="TransformerSpec")
    with pytest.raises(ValueError, match="TransformerSpec") as e:
        load_ct2(d)
    assert str(d / "model.bin") in str(e.value)


# ---------------------------------------------------------------- bad input

def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src, dst)
    except OSError:
        shutil.copy(src, dst)


def test_split_missing_last_part(models, tmp_path):
    _link_or_copy(models["base"] / "model.bin.part1", tmp_path / "model.bin.part1")
    shutil.copy(models["base"] / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="part2"):
        load_ct2(tmp_path)


def test_split_missing_middle_part(models, tmp_path):
    shutil.copy(models["base"] / "config.json", tmp_path / "config.json")
    _link_or_copy(models["base"] / "model.bin.part1", tmp_path / "model.bin.part1")
    _link_or_copy(models["base"] / "model.bin.part2", tmp_path / "model.bin.part3")
    with pytest.raises(ValueError, match=r"model\.bin\.part2 is missing"):
        load_ct2(tmp_path)


def test_split_equals_joined(models, tmp_path):
    # Cutting tiny.en's model.bin into three parts at odd offsets (inside a header, inside
    # a tensor) must read the same variables.
    data = (models["tiny.en"] / "model.bin").read_bytes()
    cuts = [0, 7, 40_000_001, len(data)]
    for i in range(3):
        (tmp_path / f"model.bin.part{i + 1}").write_bytes(data[cuts[i]:cuts[i + 1]])
    shutil.copy(models["tiny.en"] / "config.json", tmp_path / "config.json")
    a, b = read_variables(tmp_path), read_variables(models["tiny.en"])
    assert list(a) == list(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_truncated_model(models, tmp_path):
    with open(models["tiny.en"] / "model.bin", "rb") as f:
        (tmp_path / "model.bin").write_bytes(f.read(1 << 20))
    shutil.copy(models["tiny.en"] / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="truncated") as e:
        load_ct2(tmp_path)
    assert "decoder/embeddings/weight" in str(e.value)


def test_trailing_garbage(models, tmp_path):
    v = synthetic_variables()
    d = write_ct2_dir(tmp_path / "m", v)
    with open(d / "model.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="trailing"):
        read_model(d)


def test_not_a_model_dir(tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    assert not is_ct2_dir(empty)
    with pytest.raises(ValueError, match="nothing-here"):
        load_ct2(empty)
    with pytest.raises(ValueError, match="does-not-exist"):
        load_ct2(tmp_path / "does-not-exist")
