"""Reader for CTranslate2 (faster-whisper) Whisper model directories.

``model.bin`` (binary version 6, little-endian; ``str`` = u16 length incl. NUL + bytes)::

    u32 version | str "WhisperSpec" | u32 revision | u32 n
    n x { str name | u8 rank | u32 dims[rank] | u8 dtype | u32 nbytes | data }
    u32 n_aliases | n_aliases x { str alias | str target }

Split models store the same stream as ``model.bin.part1``, ``part2``, ...  Weights keep their
stored dtype so that a float16 model converts bit for bit to the Hugging Face
``WhisperForConditionalGeneration`` names; only int8/int16 quantised weights (with a
``<name>_scale`` per output row) are widened to float32.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

__all__ = ["is_ct2_dir", "load_ct2", "read_model", "read_variables", "dequantize"]

_BINARY_VERSION = 6
_SPEC_NAME = "WhisperSpec"
# CTranslate2 dtype ids.  bfloat16 has no numpy dtype: its bits are kept as uint16.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}
# Scalars with the only value the HF Whisper architecture can represent.
_EXPECTED_SCALARS = {
    "decoder/activation": 3,  # exact (erf) GELU
    "decoder/alibi": 0,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
# Scalars that carry no weight: alignment info lives in config.json as well.
_IGNORED_SCALARS = {"decoder/alignment_heads", "decoder/alignment_layer"}
_PART_RE = re.compile(r"^model\.bin\.part(\d+)$")


def _model_files(path: Path) -> list[Path]:
    """The files that make up model.bin: itself, or its parts in numeric order."""
    single = path / "model.bin"
    if single.is_file():
        return [single]
    parts = {int(m.group(1)): p for p in path.iterdir() if (m := _PART_RE.match(p.name))}
    if 1 not in parts:
        raise ValueError(f"{path}: no model.bin or model.bin.part1")
    for i in range(1, max(parts) + 1):
        if i not in parts:
            raise ValueError(f"{path}: model.bin.part{i} is missing (found parts {sorted(parts)})")
    return [parts[i] for i in sorted(parts)]


def is_ct2_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` looks like a CTranslate2 model directory (model + config or vocabulary)."""
    p = Path(path)
    if not p.is_dir():
        return False
    has_model = (p / "model.bin").is_file() or (p / "model.bin.part1").is_file()
    has_meta = any((p / f).is_file() for f in ("config.json", "vocabulary.txt", "vocabulary.json"))
    return has_model and has_meta


class _PartStream:
    """Reads the model files one after the other as a single stream, failing on short reads."""

    def __init__(self, files: list[Path]) -> None:
        self._files = files
        self._index = -1
        self._fh: BinaryIO | None = None
        self._advance()

    def _advance(self) -> None:
        self.close()
        self._index += 1
        if self._index < len(self._files):
            self._fh = open(self._files[self._index], "rb")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def read(self, n: int, what: str) -> bytearray:
        # A bytearray keeps the numpy views writable, so torch.from_numpy does not warn.
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            if self._fh is None:
                last = self._files[-1]
                msg = f"{last.parent}: model data is truncated while reading {what} (got {got} of {n} bytes)"
                if _PART_RE.match(last.name):  # for split models, the usual cause is a part never fetched
                    msg += f"; is model.bin.part{len(self._files) + 1} missing?"
                raise ValueError(msg)
            k = self._fh.readinto(view[got:])
            if k:
                got += k
            else:
                self._advance()
        return buf

    def at_end(self) -> bool:
        while self._fh is not None:
            if self._fh.read(1):
                return False
            self._advance()
        return True

    def u8(self, what: str) -> int:
        return self.read(1, what)[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.read(4, what))[0]

    def string(self, what: str) -> str:
        (n,) = struct.unpack("<H", self.read(2, what))
        raw = bytes(self.read(n, what))
        if not raw.endswith(b"\0"):
            raise ValueError(f"malformed string while reading {what}: no trailing NUL")
        return raw[:-1].decode("utf-8")


def read_model(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read the raw variables and aliases of the CTranslate2 model in directory ``path``.

    Returns ``(variables, aliases)``: variables by CT2 name in file order (bfloat16 as uint16
    bits, scalars as 0-d arrays), aliases as ``{alias: target}``.
    """
    path = Path(path)
    if not is_ct2_dir(path):
        raise ValueError(f"{path} is not a CTranslate2 model directory")
    files = _model_files(path)
    stream = _PartStream(files)
    try:
        version = stream.u32("the binary version")
        if version != _BINARY_VERSION:
            raise ValueError(f"{files[0]}: unsupported CTranslate2 binary version {version} "
                             f"(expected {_BINARY_VERSION}), or not a model.bin")
        spec = stream.string("the spec name")
        if spec != _SPEC_NAME:
            raise ValueError(f"{files[0]}: spec {spec!r} is not {_SPEC_NAME!r}")
        stream.u32("the spec revision")
        variables: dict[str, np.ndarray] = {}
        for i in range(stream.u32("the variable count")):
            name = stream.string(f"the name of variable #{i}")
            rank = stream.u8(name)
            dims = struct.unpack(f"<{rank}I", stream.read(4 * rank, name))
            dtype_id = stream.u8(name)
            if dtype_id not in _DTYPES:
                raise ValueError(f"{files[0]}: variable {name} has unknown dtype id {dtype_id}")
            nbytes = stream.u32(name)
            dtype = np.dtype(_DTYPES[dtype_id]).newbyteorder("<")
            if nbytes != dtype.itemsize * int(np.prod(dims, dtype=np.int64)):
                raise ValueError(f"{files[0]}: variable {name} has {nbytes} bytes for shape {dims}")
            variables[name] = np.frombuffer(stream.read(nbytes, name), dtype=dtype).reshape(dims)
        aliases = {}
        for i in range(stream.u32("the alias count")):
            alias = stream.string(f"alias #{i}")
            aliases[alias] = stream.string(f"the target of alias {alias}")
        if not stream.at_end():
            raise ValueError(f"{path}: trailing data after the alias table")
    finally:
        stream.close()
    return variables, aliases


def read_variables(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The stored variables of the CT2 model in ``path`` (aliases not included)."""
    return read_model(path)[0]


def dequantize(weight: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """Undo CT2 quantisation: ``weight / scale`` in float32, ``scale`` per output row (dim 0)."""
    return torch.from_numpy(_dequantize(weight, scale))


def _dequantize(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    s = np.asarray(scale, dtype=np.float32)
    if s.ndim == 1:  # one scale per output row, broadcast over the other dims (linear or conv)
        s = s.reshape(-1, *([1] * (weight.ndim - 1)))
    return weight.astype(np.float32) / s


def _to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == np.uint16:  # bfloat16 bits (numpy has no bfloat16)
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _scalar(variables: dict[str, np.ndarray], name: str) -> int:
    value = variables.get(name)
    if value is None or value.ndim != 0:
        raise ValueError(f"CT2 model has no scalar {name}")
    return int(value)


# Per-layer CT2 module -> HF module (fused projections are handled separately).
_LAYER_MODULES = {
    "self_attention/layer_norm": "self_attn_layer_norm", "self_attention/linear_1": "self_attn.out_proj",
    "attention/layer_norm": "encoder_attn_layer_norm", "attention/linear_0": "encoder_attn.q_proj",
    "attention/linear_2": "encoder_attn.out_proj",
    "ffn/layer_norm": "final_layer_norm", "ffn/linear_0": "fc1", "ffn/linear_1": "fc2",
}
# Fused projections: CT2 module -> HF modules of its equal row blocks, in order.
_FUSED: dict[str, list[str]] = {
    "self_attention/linear_0": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "attention/linear_1": ["encoder_attn.k_proj", "encoder_attn.v_proj"],
}
_TOP_RULES = {
    "encoder/conv1": "model.encoder.conv1", "encoder/conv2": "model.encoder.conv2",
    "encoder/layer_norm": "model.encoder.layer_norm", "decoder/layer_norm": "model.decoder.layer_norm",
    "encoder/position_encodings/encodings": "model.encoder.embed_positions.weight",
    "decoder/position_encodings/encodings": "model.decoder.embed_positions.weight",
    "decoder/embeddings/weight": "model.decoder.embed_tokens.weight",
}
_PARAM = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}
_LAYER_RE = re.compile(r"^(encoder|decoder)/layer_(\d+)/(.+)/(weight|bias|gamma|beta)$")


def _map_tensor(name: str, array: np.ndarray, out: dict[str, torch.Tensor]) -> None:
    """Store one CT2 tensor under its HF name(s), splitting fused projections."""
    if name in _TOP_RULES:
        out[_TOP_RULES[name]] = _to_torch(array)
        return
    top, _, param = name.rpartition("/")
    if top in _TOP_RULES and param in _PARAM:
        out[f"{_TOP_RULES[top]}.{_PARAM[param]}"] = _to_torch(array)
        return
    m = _LAYER_RE.match(name)
    if m is None:
        raise ValueError(f"unexpected CT2 variable {name}")
    side, layer, module, param = m.groups()
    prefix = f"model.{side}.layers.{layer}."
    if module in _FUSED:
        targets = _FUSED[module]
        rows = array.shape[0] // len(targets)
        if rows * len(targets) != array.shape[0]:
            raise ValueError(f"{name}: {array.shape[0]} rows do not split into {len(targets)}")
        for i, target in enumerate(targets):
            piece = array[i * rows:(i + 1) * rows]
            if target.endswith("k_proj") and param == "bias":
                # HF Whisper has no key bias.  CT2 stores zeros; a non-zero one is dropped too,
                # since q.b is the same for every key and so cancels in the softmax.
                if piece.any():
                    warnings.warn(f"{name}: dropping a non-zero key bias (softmax-invariant)")
                continue
            # Copy (numpy: torch's CPU clone of fp16 is far slower) so that each piece owns
            # its storage and the state dict can be saved with safetensors as it is.
            out[f"{prefix}{target}.{_PARAM[param]}"] = _to_torch(piece.copy())
        return
    if module not in _LAYER_MODULES:
        raise ValueError(f"unexpected CT2 variable {name}")
    out[f"{prefix}{_LAYER_MODULES[module]}.{_PARAM[param]}"] = _to_torch(array)


def load_ct2(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Load a CTranslate2 Whisper model directory as a Hugging Face state dict.

    Returns ``(arch, state_dict, ct2_config)``: ``arch`` holds the WhisperConfig architecture
    fields derived from the tensor shapes, ``state_dict`` the tensors under
    ``WhisperForConditionalGeneration`` names (without the tied ``proj_out.weight``), and
    ``ct2_config`` the parsed ``config.json`` ({} if absent).
    """
    path = Path(path)
    variables, aliases = read_model(path)
    for alias, target in aliases.items():
        # The only alias CT2 writes for Whisper is the tied output projection.
        if (alias, target) != ("decoder/projection/weight", "decoder/embeddings/weight"):
            raise ValueError(f"{path}: unexpected alias {alias} -> {target}")
    for name, expected in _EXPECTED_SCALARS.items():
        if name in variables and _scalar(variables, name) != expected:
            raise ValueError(f"{path}: {name} = {_scalar(variables, name)}, only {expected} is supported")

    state_dict: dict[str, torch.Tensor] = {}
    for name, array in variables.items():
        if name.endswith("_scale"):
            if name[: -len("_scale")] not in variables:
                raise ValueError(f"{path}: {name} has no weight to scale")
            continue  # used together with its weight
        if array.ndim == 0:
            known = name in _EXPECTED_SCALARS or name in _IGNORED_SCALARS or name.endswith("/num_heads")
            if not known:
                raise ValueError(f"{path}: unexpected CT2 scalar {name}")
            continue  # checked above; num_heads goes to arch below
        scale = variables.get(f"{name}_scale")
        if scale is not None:
            array = _dequantize(array, scale)
        elif array.dtype in (np.int8, np.int16):
            raise ValueError(f"{path}: quantised variable {name} has no {name}_scale")
        _map_tensor(name, array, state_dict)

    layers = {"encoder": set(), "decoder": set()}
    for n in variables:
        if m := _LAYER_RE.match(n):
            layers[m.group(1)].add(int(m.group(2)))
    for side, found in layers.items():
        if not found or found != set(range(len(found))):
            raise ValueError(f"{path}: {side} layers {sorted(found)} are not 0..n-1")

    def dim(key: str, axis: int) -> int:
        if key not in state_dict:
            raise ValueError(f"{path}: the model has no tensor for {key}")
        return int(state_dict[key].shape[axis])

    arch = {
        "vocab_size": dim("model.decoder.embed_tokens.weight", 0),
        "num_mel_bins": dim("model.encoder.conv1.weight", 1),
        "d_model": dim("model.decoder.embed_tokens.weight", 1),
        "encoder_layers": len(layers["encoder"]),
        "encoder_attention_heads": _scalar(variables, "encoder/num_heads"),
        "decoder_layers": len(layers["decoder"]),
        "decoder_attention_heads": _scalar(variables, "decoder/num_heads"),
        "encoder_ffn_dim": dim("model.encoder.layers.0.fc1.weight", 0),
        "decoder_ffn_dim": dim("model.decoder.layers.0.fc1.weight", 0),
        "max_source_positions": dim("model.encoder.embed_positions.weight", 0),
        "max_target_positions": dim("model.decoder.embed_positions.weight", 0),
    }
    config_file = path / "config.json"
    ct2_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    return arch, state_dict, ct2_config
