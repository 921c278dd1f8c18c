"""Tests for liteasr.audio: feature parity with transformers, decoding, errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from liteasr.audio import (
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    check_audio,
    load_audio,
    log_mel_spectrogram,
    mel_filters,
    pad_or_trim,
)

transformers = pytest.importorskip("transformers")
from transformers import WhisperFeatureExtractor  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SPEECH_DEV = SHARED / "data" / "speech-dev" / "audio"

# Both sides run the same float32 torch.stft and a float32 filter @ power
# matmul, so on one machine the difference is 0. A different BLAS or device can
# reorder the matmul sums: a few float32 ulps of relative error in the power,
# i.e. ~1e-7 after log10 and /4. 1e-4 (= 0.1 % power error) leaves plenty of
# room for that, while any real bug (window, filter norm, frame drop, floor)
# moves features by >= 1e-2.
ATOL = 1e-4


@pytest.fixture(scope="module")
def real_clip() -> np.ndarray:
    clips = sorted(SPEECH_DEV.glob("*.flac"))
    if not clips:
        if os.environ.get("CI"):
            pytest.fail(f"{SPEECH_DEV}: no speech-dev clips, required when CI is set")
        pytest.skip(f"{SHARED} not available")
    return load_audio(clips[0])


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def reference(audio: np.ndarray, n_mels: int) -> torch.Tensor:
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    return fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features[0]


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    print(f"{what}: max abs diff {diff:.3g}")
    assert diff <= ATOL, f"{what}: max abs diff {diff:.3g} > {ATOL}"


# ---------------------------------------------------------------- features


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels: int) -> None:
    ours = mel_filters(n_mels)
    assert ours.shape == (n_mels, 201) and ours.dtype == torch.float32
    ref = torch.from_numpy(WhisperFeatureExtractor(feature_size=n_mels).mel_filters.T).float()
    diff = (ours - ref).abs().max().item()
    print(f"mel_filters({n_mels}): max abs diff {diff:.3g}")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_transformers_real(real_clip: np.ndarray, n_mels: int) -> None:
    ours = log_mel_spectrogram(pad_or_trim(real_clip), n_mels)
    assert ours.shape == (n_mels, N_FRAMES)
    assert_close(ours, reference(real_clip, n_mels), f"speech n_mels={n_mels}")


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_transformers_noise(n_mels: int) -> None:
    x = noise(7.3)
    assert_close(log_mel_spectrogram(pad_or_trim(x), n_mels), reference(x, n_mels), f"noise n_mels={n_mels}")


def test_batched_equals_single() -> None:
    # Different loudness per example: the -8 floor must use each one's own peak.
    batch = np.stack([pad_or_trim(noise(3, seed=1)), pad_or_trim(0.01 * noise(5, seed=2))])
    out = log_mel_spectrogram(batch, 80)
    assert out.shape == (2, 80, N_FRAMES)
    for i in range(2):
        assert_close(out[i], log_mel_spectrogram(batch[i], 80), f"batch[{i}]")


def test_padding_and_tensor_input() -> None:
    x = noise(2)
    out = log_mel_spectrogram(torch.from_numpy(x), 80, padding=N_SAMPLES - len(x))
    assert_close(out, log_mel_spectrogram(pad_or_trim(x), 80), "padding arg")


def test_pad_or_trim() -> None:
    a = np.ones((2, 5), dtype=np.float32)
    assert pad_or_trim(a, 3).shape == (2, 3)
    padded = pad_or_trim(a, 8)
    assert padded.shape == (2, 8) and padded[:, 5:].sum() == 0
    assert pad_or_trim(a, 4, axis=0).shape == (4, 5)
    t = torch.ones(2, 5)
    assert pad_or_trim(t, 3).shape == (2, 3)
    assert pad_or_trim(t, 8)[:, 5:].sum() == 0
    assert pad_or_trim(t, 4, axis=0).shape == (4, 5)
    assert isinstance(pad_or_trim(t, 8), torch.Tensor)


# ---------------------------------------------------------------- decoding


def test_resample_and_downmix(tmp_path: Path) -> None:
    sr, seconds, freq = 44100, 1.5, 440.0
    t = np.arange(int(sr * seconds)) / sr
    tone = 0.5 * np.sin(2 * np.pi * freq * t)
    path = tmp_path / "tone.wav"
    sf.write(path, np.stack([tone, tone], axis=1), sr)  # stereo, 44.1 kHz

    audio = load_audio(path)
    assert audio.ndim == 1 and audio.dtype == np.float32
    assert abs(len(audio) - seconds * SAMPLE_RATE) <= 1
    spectrum = np.abs(np.fft.rfft(audio))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / len(audio)
    assert abs(peak_hz - freq) < 2.0
    assert abs(np.abs(audio).max() - 0.5) < 0.02  # averaging, not summing, channels


@pytest.mark.parametrize("fmt,subtype", [("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_compressed_formats(tmp_path: Path, fmt: str, subtype: str) -> None:
    path = tmp_path / f"noise.{fmt.lower()}"
    sf.write(path, noise(1), SAMPLE_RATE, format=fmt, subtype=subtype)
    audio = load_audio(path)
    # mp3 encoders may add a few ms of priming/padding samples.
    assert audio.dtype == np.float32 and abs(len(audio) - SAMPLE_RATE) < 0.1 * SAMPLE_RATE


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio(tmp_path / "nope.wav")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises((IsADirectoryError, ValueError), match=tmp_path.name):
        load_audio(tmp_path)


@pytest.mark.parametrize("ffmpeg", ["none", "failing", "real"])
def test_corrupt_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ffmpeg: str) -> None:
    if ffmpeg == "real" and shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed")
    if ffmpeg == "none":
        monkeypatch.setattr(shutil, "which", lambda name: None)
    if ffmpeg == "failing":
        # A stand-in ffmpeg that fails like the real one does on garbage input,
        # so the fallback's error path is exercised even where ffmpeg is absent.
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        fake = bin_dir / "ffmpeg"
        fake.write_text("#!/bin/sh\necho 'Invalid data found when processing input' >&2\nexit 1\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n")
    with pytest.raises(ValueError, match=r"notes\.wav: cannot decode audio"):
        load_audio(path)


def test_zero_length(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match=r"empty\.wav: .*no samples"):
        load_audio(path)


def test_nan_in_file(tmp_path: Path) -> None:
    x = noise(0.5)
    x[100] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, x, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"nan\.wav: .*NaN"):
        load_audio(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_audio_non_finite(bad: float) -> None:
    x = noise(0.1)
    x[3] = bad
    with pytest.raises(ValueError, match="clip7: .*NaN/inf"):
        check_audio(x, name="clip7")


def test_check_audio_shape_dtype_empty() -> None:
    with pytest.raises(ValueError, match="a: expected 1-D"):
        check_audio(np.zeros((2, 10), dtype=np.float32), name="a")
    with pytest.raises(ValueError, match="b: expected floating"):
        check_audio(np.zeros(10, dtype=np.int16), name="b")
    with pytest.raises(ValueError, match="c: .*no samples"):
        check_audio(np.zeros(0, dtype=np.float32), name="c")
    out = check_audio(np.zeros(10, dtype=np.float64))
    assert out.dtype == np.float32


def test_mel_batch_masks_real_audio_frames():
    from liteasr.audio import log_mel_spectrogram, mel_batch

    rng = np.random.default_rng(0)
    clips = [rng.uniform(-0.1, 0.1, n).astype(np.float32) for n in (16000, 320 * 700 + 1, 40 * 16000)]
    mel, mask = mel_batch(clips, 80, dtype=torch.float16)
    assert mel.shape == (3, 80, 3000) and mel.dtype == torch.float16 and mask.shape == (3, 1500)
    assert mask.sum(1).tolist() == [50, 701, 1500]  # 20 ms per frame, a started frame counts, 30 s at most
    assert all(m[: int(m.sum())].all() for m in mask)  # real audio first, padding after
    alone = log_mel_spectrogram(pad_or_trim(clips[1]), 80).half()
    assert torch.equal(mel[1], alone)  # batched features equal one clip's own
