"""16-bit PCM bundles: audio for the GPU machine, which has no libsndfile.

The speech-dev clips are 16-bit FLAC, so `load_audio` returns int16 / 32768 exactly; `save` checks
that and stores the clips as one int16 array plus offsets (half the bytes of float32), and `load`
gives back the very same float32 arrays. Imported by the benchmark scripts beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save(path: Path, arrays: list[np.ndarray], names: list[str]) -> None:
    """Write `arrays` (float32, 16 kHz) to `path` (.npz); `names` name the clips in the error."""
    pcm = [np.round(a * 32768).astype(np.int16) for a in arrays]
    for name, a, q in zip(names, arrays, pcm):
        if not np.array_equal(q.astype(np.float32) / 32768, a):
            raise SystemExit(f"{name}: samples are not 16-bit PCM, int16 would not carry them exactly")
    np.savez(path, pcm=np.concatenate(pcm), offsets=np.cumsum([0] + [len(q) for q in pcm]))


def load(path: Path) -> list[np.ndarray]:
    """The float32 arrays `save` wrote, in order."""
    data = np.load(path)
    o = data["offsets"]
    return [data["pcm"][o[i]: o[i + 1]].astype(np.float32) / 32768 for i in range(len(o) - 1)]
