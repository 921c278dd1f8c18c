"""openai-whisper as the behavioural reference: our weights in its checkpoint format, and a runner
that records what its `transcribe` fed to word alignment.

    ref = openai_whisper_model(tiny_en, "tiny.en", tmp_path)   # whisper.model.Whisper, CPU, fp32
    run = transcribe_reference(ref, audio, word_timestamps=True, temperature=0.0)
    run.result["segments"]   # openai-whisper's output
    run.windows              # per window: the inputs add_word_timestamps saw (deep copies) and its output

openai-whisper (`pip install --no-deps openai-whisper tiktoken numba`) is a test dependency only;
liteasr never imports it. Factored (LiteASR) encoder layers are multiplied out to dense weights,
since openai-whisper has no low-rank layers: the compressed model is then the same function up to
float rounding.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# Our (Hugging Face) module names -> openai-whisper's, applied in order to each state-dict key.
_RENAMES = [
    (r"^encoder\.embed_positions\.weight$", "encoder.positional_embedding"),
    (r"^decoder\.embed_positions\.weight$", "decoder.positional_embedding"),
    (r"^decoder\.embed_tokens\.", "decoder.token_embedding."),
    (r"^encoder\.layer_norm\.", "encoder.ln_post."),
    (r"^decoder\.layer_norm\.", "decoder.ln."),
    (r"\.layers\.(\d+)\.", r".blocks.\1."),
    (r"\.self_attn_layer_norm\.", ".attn_ln."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
    (r"\.final_layer_norm\.", ".mlp_ln."),
    (r"\.self_attn\.", ".attn."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.q_proj\.", ".query."),
    (r"\.k_proj\.", ".key."),
    (r"\.v_proj\.", ".value."),
    (r"\.out_proj\.", ".out."),
    (r"\.fc1\.", ".mlp.0."),
    (r"\.fc2\.", ".mlp.2."),
]


def openai_whisper_name(name: str) -> str:
    """One of our state-dict names -> openai-whisper's, e.g. decoder.layers.0.encoder_attn.q_proj.weight ->
    decoder.blocks.0.cross_attn.query.weight."""
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def openai_whisper_checkpoint(model) -> dict:
    """A liteasr Whisper as openai-whisper's checkpoint dict {"dims", "model_state_dict"} (fp32, CPU)."""
    from liteasr.model import dense_weight, encoder_linears

    d = model.dims
    dims = dict(n_mels=d.num_mel_bins, n_audio_ctx=d.max_source_positions, n_audio_state=d.d_model,
                n_audio_head=d.encoder_attention_heads, n_audio_layer=d.encoder_layers, n_vocab=d.vocab_size,
                n_text_ctx=d.max_target_positions, n_text_state=d.d_model, n_text_head=d.decoder_attention_heads,
                n_text_layer=d.decoder_layers)
    state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()
             if not k.endswith((".weight1", ".weight2"))}
    for name, layer in encoder_linears(model).items():  # factored layers -> their dense product
        weight, bias = dense_weight(layer)
        state[f"{name}.weight"] = weight.detach().float().cpu().contiguous()
        if bias is not None:
            state[f"{name}.bias"] = bias.detach().float().cpu().clone()
        elif f"{name}.bias" in state:
            del state[f"{name}.bias"]
    # A factored k_proj carries a bias (the folded PCA mean) that Whisper's key projection lacks.
    # Dropping it is exact: it adds q·b to every score of a query, which the softmax cancels.
    for name in [k for k in state if re.search(r"\.k_proj\.bias$", k)]:
        del state[name]
    return {"dims": dims, "model_state_dict": {openai_whisper_name(k): v for k, v in state.items()}}


def openai_whisper_model(model, name: str | None, tmp_dir: Path):
    """Load `model`'s weights into openai-whisper through its own checkpoint file and loader.

    `name` ("tiny.en", "base", …) selects openai-whisper's alignment heads for that model; None keeps
    its default (the decoder's second half)."""
    import whisper

    path = Path(tmp_dir) / "openai_whisper_checkpoint.pt"
    torch.save(openai_whisper_checkpoint(model), path)
    ref = whisper.load_model(str(path), device="cpu")
    if name is not None:
        ref.set_alignment_heads(whisper._ALIGNMENT_HEADS[name])
    return ref.eval()


def openai_whisper_heads(name: str, layers: int, heads: int) -> list[tuple[int, int]]:
    """openai-whisper's alignment heads of model `name` as sorted (layer, head) pairs."""
    import base64
    import gzip

    import whisper

    mask = np.frombuffer(gzip.decompress(base64.b85decode(whisper._ALIGNMENT_HEADS[name])), dtype=bool)
    return [(int(l), int(h)) for l, h in np.argwhere(mask.reshape(layers, heads))]


@dataclass
class AlignedWindow:
    """One call of openai-whisper's add_word_timestamps: its inputs (before it changed them) and output."""

    segments_in: list[dict]  # seek, start, end, tokens (with timestamp tokens) as decoded
    segments_out: list[dict]  # the same segments after alignment (start/end refined, "words" added)
    mel: torch.Tensor  # (n_mels, 3000) the window's log-mel
    num_frames: int  # mel frames of real audio in the window
    last_speech_timestamp: float


@dataclass
class ReferenceRun:
    result: dict  # openai-whisper's transcribe() output
    windows: list[AlignedWindow] = field(default_factory=list)


def transcribe_reference(ref, audio: np.ndarray, **options) -> ReferenceRun:
    """openai-whisper's `transcribe(ref, audio, **options)` (CPU fp32, quiet), recording every window's
    word-alignment inputs and outputs when word_timestamps=True."""
    import sys

    import whisper  # noqa: F401  (the package's __init__ rebinds `whisper.transcribe` to the function)

    wt = sys.modules["whisper.transcribe"]
    run = ReferenceRun(result={})
    original = wt.add_word_timestamps

    def recording(*, segments, mel, num_frames, last_speech_timestamp, **kwargs):
        before = copy.deepcopy(segments)
        for s in before:
            s["tokens"] = list(s["tokens"])
        original(segments=segments, mel=mel, num_frames=num_frames, last_speech_timestamp=last_speech_timestamp,
                 **kwargs)
        run.windows.append(AlignedWindow(before, copy.deepcopy(segments), mel.detach().clone(), int(num_frames),
                                         float(last_speech_timestamp)))

    wt.add_word_timestamps = recording
    try:
        run.result = wt.transcribe(ref, audio.astype(np.float32), verbose=None, fp16=False, **options)
    finally:
        wt.add_word_timestamps = original
    return run


__all__ = ["openai_whisper_name", "openai_whisper_checkpoint", "openai_whisper_model", "openai_whisper_heads",
           "transcribe_reference", "ReferenceRun", "AlignedWindow"]
