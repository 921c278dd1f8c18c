"""Transcripts of the check clips (the test suite's 25 fixed speech-dev clips of at most 30 s) plus one long-form
input (three clips joined, > 30 s) as JSON: run it on two versions of liteasr (PYTHONPATH=...) and compare the
files byte for byte to show that a change kept every transcript, segment and timestamp.

    PYTHONPATH=. python benchmarks/check_transcripts.py --model tiny.en --out before.json
    python -c "import sys; a, b = (open(f).read() for f in sys.argv[1:]); print('identical' if a == b else 'DIFFERENT')" before.json after.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import liteasr
from liteasr.audio import load_audio

SPEECH_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech-dev"
CHECK_STRIDE, JFK_ID = 15, "jfk_inaugural"


def check_clips(manifest: Path) -> list[dict]:
    """The same rule as tests/conftest.py's check_clips fixture."""
    rows = sorted((json.loads(x) for x in manifest.read_text().splitlines() if x.strip()), key=lambda r: r["id"])
    short = [r for r in rows if r["duration_s"] <= 30.0]
    chosen = short[::CHECK_STRIDE]
    domains = {r["domain"] for r in chosen}
    for r in short:
        if r["domain"] not in domains:
            chosen.append(r)
            domains.add(r["domain"])
    if not any(r["id"] == JFK_ID for r in chosen):
        chosen += [r for r in short if r["id"] == JFK_ID]
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--manifest", default=str(SPEECH_DEV / "manifest.jsonl"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    clips = check_clips(Path(a.manifest))
    arrays = [load_audio(Path(a.manifest).parent / c["audio"]) for c in clips]
    model = liteasr.load_model(a.model, device=a.device)
    out = {"clips": [c["id"] for c in clips]}
    out["short"] = model.transcribe(arrays, batch_size=8)
    n = next(i for i in range(len(arrays)) if sum(len(x) for x in arrays[:i]) > 90 * 16000)
    out["long"] = model.transcribe(np.concatenate(arrays[:n]), batch_size=8)  # > 90 s: long-form seeking
    Path(a.out).write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(f"{len(clips)} clips + 1 long input ({sum(len(x) for x in arrays[:n]) / 16000:.0f} s) -> {a.out}")


if __name__ == "__main__":
    main()
