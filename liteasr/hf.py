"""transformers integration: lite-whisper checkpoints as first-class transformers models.

After `import liteasr` (which calls `register()`), `AutoConfig`, `AutoModel`, `AutoModelForSpeechSeq2Seq`
and `pipeline("automatic-speech-recognition")` load any lite-whisper directory — ours or the published
efficient-speech ones — without `trust_remote_code`; `generate()` is transformers' own Whisper generate.

The two sections marked "remote code" import only torch and transformers: `export` writes each out
verbatim as configuration_lite_whisper.py / modeling_lite_whisper.py, so that users without liteasr
load an exported directory with `trust_remote_code=True`. Works with transformers 4.49+ and 5.x.
"""

from __future__ import annotations

# ==== remote code: configuration_lite_whisper.py ====
from transformers import WhisperConfig

LOW_RANK_KEYS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # the factorable encoder linears


class LiteWhisperConfig(WhisperConfig):
    """WhisperConfig plus `low_rank_config`: one dict per encoder layer mapping any of LOW_RANK_KEYS
    to its rank; a missing key means that linear is dense."""

    model_type = "lite-whisper"

    def __init__(self, low_rank_config: list[dict[str, int]] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.low_rank_config = check_low_rank_config(low_rank_config, self.encoder_layers)
        # transformers picks its Whisper-only code paths (the ASR pipeline's chunking and timestamps,
        # generate's prompt handling) by `config.model_type == "whisper"`, and a lite-whisper is a
        # Whisper for all of them. The class attribute, which config.json and the Auto* registries
        # read, stays "lite-whisper".
        self.model_type = "whisper"


def check_low_rank_config(low_rank_config, n_layers: int) -> list[dict[str, int]]:
    """The validated per-layer ranks ([{}] * n_layers for None); a ValueError names the bad layer and key."""
    if low_rank_config is None:
        return [{} for _ in range(n_layers)]
    if not isinstance(low_rank_config, (list, tuple)) or len(low_rank_config) != n_layers:
        n = len(low_rank_config) if isinstance(low_rank_config, (list, tuple)) else type(low_rank_config).__name__
        raise ValueError(f"low_rank_config has {n} entries, but the encoder has {n_layers} layers (encoder_layers)")
    for i, ranks in enumerate(low_rank_config):
        if not isinstance(ranks, dict):
            raise ValueError(f"low_rank_config[{i}] (encoder layer {i}) is {ranks!r}, not a dict of ranks")
        unknown = sorted(set(ranks) - set(LOW_RANK_KEYS))
        if unknown:
            raise ValueError(f"low_rank_config[{i}] (encoder layer {i}) has unknown keys {unknown}; "
                             f"allowed: {', '.join(LOW_RANK_KEYS)}")
        bad = {k: r for k, r in ranks.items() if isinstance(r, bool) or not isinstance(r, int) or r < 1}
        if bad:
            raise ValueError(f"low_rank_config[{i}] (encoder layer {i}) has invalid ranks {bad} (positive ints)")
    return [dict(ranks) for ranks in low_rank_config]


# ==== remote code: modeling_lite_whisper.py ====
import torch
from torch import nn
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer


class LowRankLinear(nn.Module):
    """y = (x @ weight1) @ weight2 + bias in the published layout: weight1 (in, r), weight2 (r, out), bias (out,)."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight1 = nn.Parameter(torch.empty(in_features, rank))
        self.weight2 = nn.Parameter(torch.empty(rank, out_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:  # nn.Linear's output scale: Var(y_j) ≈ Var(x) / 3 per unit input
        nn.init.normal_(self.weight1, std=self.in_features ** -0.5)
        nn.init.normal_(self.weight2, std=(3 * self.rank) ** -0.5)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        h = x @ self.weight1  # (..., r): the cheap rank-r intermediate
        return torch.addmm(self.bias, h.flatten(0, -2), self.weight2).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LiteWhisperEncoderLayer(WhisperEncoderLayer):
    """A WhisperEncoderLayer whose linears named in `ranks` are LowRankLinear from the start. The dense
    skeleton is built on the meta device, so no dense weight of a factored linear is ever allocated."""

    def __init__(self, config: WhisperConfig, ranks: dict[str, int]) -> None:
        device = torch.empty(0).device  # the caller's: "meta" already when transformers 5 loads a checkpoint
        with torch.device("meta"):
            super().__init__(config)
            for name, rank in ranks.items():
                parent = self if name in ("fc1", "fc2") else self.self_attn
                dense = getattr(parent, name)
                setattr(parent, name, LowRankLinear(dense.in_features, dense.out_features, rank))
        # Allocate and initialise the rest as the constructors would; through setattr (register_parameter),
        # which transformers 4.x's init_empty_weights redirects to meta while it loads a checkpoint.
        for module in self.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(torch.empty_like(p, device=device), p.requires_grad))
            if hasattr(module, "reset_parameters"):  # a no-op under from_pretrained's no_init_weights
                module.reset_parameters()


class LiteWhisperForConditionalGeneration(WhisperForConditionalGeneration):
    """WhisperForConditionalGeneration with the encoder's linears factored per `config.low_rank_config`.

    Loading checks the checkpoint against low_rank_config (errors name the layer and tensor) and fills
    the generation defaults that published lite-whisper checkpoints lack (max_length, begin_suppress_tokens).
    """

    config_class = LiteWhisperConfig
    _no_split_modules = ["LiteWhisperEncoderLayer", "WhisperEncoderLayer", "WhisperDecoderLayer"]

    def __init__(self, config: LiteWhisperConfig) -> None:
        n_layers = config.encoder_layers
        config.encoder_layers = 0  # the parent builds everything but the encoder layers ...
        try:
            super().__init__(config)
        finally:
            config.encoder_layers = n_layers
        self.model.encoder.layers = nn.ModuleList(  # ... which are built factored, and nothing is thrown away
            LiteWhisperEncoderLayer(config, ranks) for ranks in config.low_rank_config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info, reinit = kwargs.pop("output_loading_info", False), kwargs.pop("ignore_mismatched_sizes", False)
        # Mismatched shapes are collected rather than raised, so that the error below can name the rank.
        model, info = super().from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
        check_loading_info(model, {**info, "mismatched_keys": () if reinit else info.get("mismatched_keys", ())})
        fill_generation_defaults(model.generation_config, model.config)
        return (model, info) if want_info else model


def check_loading_info(model: nn.Module, info: dict) -> None:
    """Raise a ValueError naming the layer and tensor of every weight the checkpoint lacks, adds or mis-shapes."""
    problems = [f"{k}: missing from the checkpoint" for k in info.get("missing_keys", ())]
    problems += [f"{k}: in the checkpoint, not in the model" for k in info.get("unexpected_keys", ())]
    for m in info.get("mismatched_keys", ()):  # transformers 5: (key, checkpoint shape, model shape); 4.x: key
        key, found = (m[0], tuple(m[1])) if isinstance(m, tuple) else (m, "another")
        expected = tuple(model.get_parameter(key).shape)
        problems.append(f"{key}: shape {expected} from config.json, {found} in the checkpoint")
    if problems:
        layers = sorted({int(p.split(".layers.")[1].split(".")[0]) for p in problems if ".encoder.layers." in p})
        ranks = "".join(f"\n  low_rank_config[{i}] = {model.config.low_rank_config[i]}" for i in layers)
        raise ValueError("the checkpoint does not match the model that config.json describes:\n  "
                         + "\n  ".join(sorted(problems)) + (ranks and "\nranks in config.json:" + ranks))


def fill_generation_defaults(gen: GenerationConfig, config: WhisperConfig) -> None:
    """Whisper's own defaults for fields that published checkpoints lack: without max_length transformers
    stops after 20 tokens, and `begin_suppress_tokens: null` lets a transcript start with a blank or EOT."""
    if gen.max_length in (None, GenerationConfig().max_length):
        gen.max_length = config.max_target_positions
    if gen.begin_suppress_tokens is None:
        gen.begin_suppress_tokens = [220, config.eos_token_id]  # " " is token 220 in every Whisper vocabulary


# ==== liteasr only (not exported) ====
import json
import re
from pathlib import Path

PYPI_BASE_MODELS = {"tiny.en": "openai/whisper-tiny.en", "base": "openai/whisper-base"}  # liteasr.fetch names


def register() -> None:
    """Make transformers' Auto classes and pipelines load lite-whisper directories with the classes above.
    Idempotent. AutoModel maps to the generation model, as the published checkpoints' auto_map does."""
    from transformers import (AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForSpeechSeq2Seq,
                              AutoProcessor, AutoTokenizer, WhisperFeatureExtractor, WhisperProcessor,
                              WhisperTokenizer, WhisperTokenizerFast)

    AutoConfig.register("lite-whisper", LiteWhisperConfig, exist_ok=True)
    AutoModel.register(LiteWhisperConfig, LiteWhisperForConditionalGeneration, exist_ok=True)
    AutoModelForSpeechSeq2Seq.register(LiteWhisperConfig, LiteWhisperForConditionalGeneration, exist_ok=True)
    AutoTokenizer.register(LiteWhisperConfig, slow_tokenizer_class=WhisperTokenizer,
                           fast_tokenizer_class=WhisperTokenizerFast, exist_ok=True)
    AutoFeatureExtractor.register(LiteWhisperConfig, WhisperFeatureExtractor, exist_ok=True)
    AutoProcessor.register(LiteWhisperConfig, WhisperProcessor, exist_ok=True)


def remote_code() -> dict[str, str]:
    """{file name: source} of the remote-code files: the marked sections of this module, verbatim."""
    from . import __version__

    parts = re.split(r"^# ==== (.+) ====\n", Path(__file__).read_text(), flags=re.M)
    section = dict(zip(parts[1::2], parts[2::2]))
    head = (f'"""{{}} for lite-whisper checkpoints, written by liteasr {__version__} from liteasr/hf.py.\n'
            'Needs only torch and transformers (4.49+ or 5.x)."""\n\nfrom __future__ import annotations\n\n')
    return {"configuration_lite_whisper.py": head.format("Configuration")
            + section["remote code: configuration_lite_whisper.py"].strip() + "\n",
            "modeling_lite_whisper.py": head.format("Model classes")
            + "from .configuration_lite_whisper import LiteWhisperConfig\n"
            + section["remote code: modeling_lite_whisper.py"].strip() + "\n"}


def export(model, output, base_model: str | None = None, eval_report: str | None = None,
           save_dtype: torch.dtype = torch.float16, overwrite: bool = False) -> Path:
    """Write a compressed model as a directory that transformers loads *without* liteasr.

    model: a liteasr `Whisper` with factored layers, or anything `liteasr.load_model` reads (a
    directory written by `liteasr compress` also gives its compression.json to the model card).
    The directory holds the checkpoint in the published lite-whisper layout, the remote-code files
    (`AutoModelForSpeechSeq2Seq.from_pretrained(dir, trust_remote_code=True)`) and a README.md model
    card. base_model: hub id for the card's metadata (default: from compression.json); eval_report:
    a `liteasr eval` JSON report whose WER goes on the card. Written atomically.
    """
    from .checkpoint import load_model, read_json, resolve, save

    source = None if isinstance(model, nn.Module) else resolve(model)
    model = model if source is None else load_model(source)
    if not any(model.low_rank_config):
        raise ValueError("the model has no factored layers: it is a plain Whisper (write it with `liteasr convert`)")
    has_report = source is not None and (source / "compression.json").is_file()
    compression = read_json(source / "compression.json") if has_report else {}
    report = read_json(Path(eval_report)) if eval_report else None
    card = model_card(Path(output).name, model, save_dtype, base_model or _hub_id(compression.get("model")),
                      compression, report)
    extra = remote_code() | {"README.md": card} | ({"compression.json": json.dumps(compression, indent=1)}
                                                   if compression else {})
    # save() writes the config with liteasr's one AUTO_MAP, which names the remote-code files shipped here
    return save(model, output, dtype=save_dtype, overwrite=overwrite, extra_files=extra)


CARD = """\
---
{base_model}library_name: transformers
pipeline_tag: automatic-speech-recognition
tags: [whisper, lite-whisper, liteasr, low-rank]
---

# {name}

{base} with its encoder compressed by LiteASR: each factored linear is the product of two low-rank
matrices found by PCA of its outputs on calibration audio. The checkpoint uses the published
lite-whisper layout (`low_rank_config`, `weight1 (in, r)` / `weight2 (r, out)`).

| | |
|---|---|
| thresholds θ (attention:MLP) | {theta} |
| factored encoder linears | {factored} of {total} |
| encoder linear parameters | {after:.2f} M of {before:.2f} M ({percent:.1f} %) |
| checkpoint size | {size:.1f} MB ({dtype}) |
| WER | {wer} |
| calibration | {calibration} |

## Ranks per encoder layer

{ranks}

## Usage

Without liteasr (transformers 4.49+ or 5.x; the model code ships in this directory):

```python
from transformers import pipeline

asr = pipeline("automatic-speech-recognition", model="{name}", trust_remote_code=True)
print(asr("audio.flac")["text"])
```

With liteasr installed, `import liteasr` registers these classes with transformers (no
`trust_remote_code` needed), and `liteasr.load_model("{name}")` runs the model on liteasr's own runtime.
"""


def model_card(name: str, model: nn.Module, save_dtype: torch.dtype, base_model: str | None, compression: dict,
               report: dict | None) -> str:
    """README.md of an exported liteasr `Whisper`: metadata, thresholds, ranks, sizes, WER and calibration."""
    from .model import encoder_linears

    lrc, linears = model.low_rank_config, encoder_linears(model).values()
    size_bytes = sum(v.numel() * (save_dtype.itemsize if v.is_floating_point() else v.element_size())
                     for v in model.state_dict().values())  # the weights as saved (the file adds a small header)
    before = sum(m.in_features * m.out_features for m in linears)
    after = sum(p.numel() for m in linears for p in m.parameters() if p.dim() == 2)
    rows = ["| layer | " + " | ".join(LOW_RANK_KEYS) + " |", "|---" * (len(LOW_RANK_KEYS) + 1) + "|"]
    rows += [f"| {i} | " + " | ".join(str(r.get(k, "dense")) for k in LOW_RANK_KEYS) + " |" for i, r in enumerate(lrc)]
    wer, clips = "not measured", compression.get("calibration")
    policy = compression.get("frame_policy", compression.get("frames", "?"))  # older files: "frames"
    if report:
        o, data = report["overall"], Path(report.get("manifest", "?"))
        wer = f"{100 * o['error_rate']:.2f} % ({o['metric']}) on {data.parent.name or data.name}, {o['n']} clips"
    return CARD.format(
        name=name, base_model=f"base_model: {base_model}\n" if base_model else "", base=base_model or "A Whisper model",
        theta=":".join(map(str, compression["threshold"])) if "threshold" in compression else "not recorded",
        factored=sum(map(len, lrc)), total=len(lrc) * len(LOW_RANK_KEYS), before=before / 1e6, after=after / 1e6,
        percent=100 * after / before, size=size_bytes / 1e6, dtype=str(save_dtype).removeprefix("torch."), wer=wer,
        calibration=f"{len(clips)} clips, statistics over {policy} frames" if clips
        else "not recorded", ranks="\n".join(rows))


def _hub_id(name: str | None) -> str | None:
    """The hub id of a base model named in compression.json (PyPI names mapped; local paths dropped)."""
    name = PYPI_BASE_MODELS.get(name, name)
    return name if name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists() else None


register()  # importing this module first (before transformers) still registers: see liteasr/__init__.py
