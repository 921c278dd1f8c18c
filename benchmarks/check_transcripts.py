"""Transcripts of the check clips (the test suite's 25 fixed speech-dev clips of at most 30 s) plus one long-form
input (three clips joined, > 30 s) as JSON: run it on two versions of liteasr (PYTHONPATH=...) and compare the
files byte for byte to show that a change kept every transcript, segment and timestamp.

    PYTHONPATH=. python benchmarks/check_transcripts.py --model tiny.en --out before.json
    python -c "import sys; a, b = (open(f).read() for f in sys.argv[1:]); print('identical' if a == b else 'DIFFERENT')" before.json after.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import liteasr
from liteasr.audio import load_audio

SPEECH_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech-dev"
sys.path.insert(0, str(Path(__file__).parent))
from cuda_real_weights import check_clip_rows as check_clips  # noqa: E402  (the tests' check-clip rule, once)
import pcm  # noqa: E402  benchmarks/pcm.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--manifest", default=str(SPEECH_DEV / "manifest.jsonl"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plain-greedy", action="store_true",
                    help="greedy without temperature fallback or conditioning on earlier text (the decoding of "
                    "liteasr before beam search/fallback existed)")
    ap.add_argument("--runtime", default="eager", choices=["eager", "cuda-fp32", "cuda-fp16"],
                    help="eager: the model itself; cuda-*: a CudaRuntime (fp32 with TF32 off, or fp16)")
    ap.add_argument("--save-audio", default=None, help="write the clips as int16 PCM (.npz) for the GPU machine")
    ap.add_argument("--audio", default=None, help="read the clips from such an .npz instead of the manifest")
    a = ap.parse_args()
    if a.audio:
        arrays, ids = pcm.load(Path(a.audio)), None
    else:
        clips = check_clips(Path(a.manifest))
        arrays, ids = [load_audio(Path(a.manifest).parent / c["audio"]) for c in clips], [c["id"] for c in clips]
        if a.save_audio:
            pcm.save(Path(a.save_audio), arrays, ids)
    import torch

    dtype = torch.float16 if a.runtime == "cuda-fp16" else torch.float32
    model = liteasr.load_model(a.model, device=a.device, dtype=dtype)
    if a.runtime.startswith("cuda"):
        from liteasr.cuda import CudaRuntime

        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        model = CudaRuntime(model)
    opts = dict(temperature=0.0, condition_on_previous_text=False) if a.plain_greedy else {}
    out = {"clips": ids}
    out["short"] = model.transcribe(arrays, batch_size=8, **opts)
    n = next(i for i in range(len(arrays)) if sum(len(x) for x in arrays[:i]) > 90 * 16000)
    out["long"] = model.transcribe(np.concatenate(arrays[:n]), batch_size=8, **opts)  # > 90 s: long-form seeking
    Path(a.out).write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(f"{len(arrays)} clips + 1 long input ({sum(len(x) for x in arrays[:n]) / 16000:.0f} s) -> {a.out}")


if __name__ == "__main__":
    main()
