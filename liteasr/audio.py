"""Audio loading and Whisper's log-mel front end.

Everything Whisper sees is 16 kHz mono float32 audio, cut or padded to 30 s,
turned into an (n_mels, 3000) log-mel spectrogram. The features here match
transformers' ``WhisperFeatureExtractor`` (and openai/whisper) numerically.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms analysis window
HOP_LENGTH = 160  # 10 ms hop
CHUNK_LENGTH = 30  # seconds of audio per encoder window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames / s

# The encoder's second conv has stride 2, so each output position covers 2 mel
# frames: 1500 positions per window, 20 ms each. Timestamp tokens use the same
# 20 ms grid, hence Whisper's "token" naming.
ENCODER_STRIDE = 2
N_SAMPLES_PER_TOKEN = HOP_LENGTH * ENCODER_STRIDE  # 320
TOKENS_PER_SECOND = SAMPLE_RATE // N_SAMPLES_PER_TOKEN  # 50

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def check_audio(audio: np.ndarray, name: str = "audio") -> np.ndarray:
    """Validate a mono waveform and return it as float32.

    Raises ValueError (message starting with ``name``) if the array is not
    1-D floating point, is empty, or holds NaN/inf samples.
    """
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"{name}: expected 1-D mono audio, got shape {audio.shape}")
    if not np.issubdtype(audio.dtype, np.floating):
        # Integer PCM has no agreed scale (int16? int32?), so refuse to guess.
        raise ValueError(f"{name}: expected floating-point samples in [-1, 1], got dtype {audio.dtype}")
    if audio.size == 0:
        raise ValueError(f"{name}: audio has no samples (zero length)")
    bad = ~np.isfinite(audio)
    if bad.any():
        raise ValueError(f"{name}: audio contains {int(bad.sum())} NaN/inf samples")
    return audio.astype(np.float32, copy=False)


def _decode_ffmpeg(path: str, sr: int) -> np.ndarray:
    # ffmpeg does the downmix and resampling itself; raw float32 on stdout.
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", path,
           "-f", "f32le", "-ac", "1", "-ar", str(sr), "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        raise ValueError(f"{path}: cannot decode audio (ffmpeg: {lines[-1] if lines else proc.returncode})")
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()  # writable, like soundfile's arrays


def load_audio(path: str | os.PathLike, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as a float32 mono waveform at ``sr`` Hz, shape (T,).

    Decodes with soundfile (wav, flac, ogg, mp3, ...) and falls back to
    ``ffmpeg`` on PATH for other formats. Raises FileNotFoundError for a
    missing file, IsADirectoryError for a directory, and ValueError for a
    file that cannot be decoded, is empty, or contains NaN/inf samples.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, not an audio file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such audio file")

    import soundfile as sf  # imported here: the GPU runtime and MLX paths need no audio I/O stack

    try:
        data, file_sr = sf.read(path, dtype="float32", always_2d=True)  # (T, C)
    except sf.SoundFileError as err:
        if shutil.which("ffmpeg") is None:
            raise ValueError(f"{path}: cannot decode audio ({err}; ffmpeg not found for fallback)") from None
        return check_audio(_decode_ffmpeg(path, sr), name=path)

    # Average channels rather than taking the first: keeps both sides of a
    # stereo recording and is what ffmpeg's -ac 1 does too.
    audio = check_audio(data.mean(axis=1), name=path)  # (T,)
    if file_sr != sr:
        # Exact rational resampling, e.g. 44100 -> 16000 is up 160 / down 441.
        g = math.gcd(sr, file_sr)
        from scipy.signal import resample_poly

        audio = resample_poly(audio, sr // g, file_sr // g)
    return check_audio(audio, name=path)


def pad_or_trim(array: ArrayT, length: int = N_SAMPLES, axis: int = -1) -> ArrayT:
    """Zero-pad or cut ``array`` along ``axis`` to exactly ``length`` samples.

    Works on numpy arrays and torch tensors; returns the same type.
    """
    axis = axis % array.ndim
    n = array.shape[axis]
    if n > length:
        if isinstance(array, torch.Tensor):
            return array.narrow(axis, 0, length)
        return np.take(array, np.arange(length), axis=axis)
    if n < length:
        if isinstance(array, torch.Tensor):
            # F.pad lists (left, right) pairs starting from the LAST dim.
            pad = [0, 0] * (array.ndim - 1 - axis) + [0, length - n]
            return F.pad(array, pad)
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, length - n)
        return np.pad(array, widths)
    return array


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    # Slaney scale: linear (3 mels / 200 Hz) below 1 kHz, logarithmic above,
    # with 27 mels per factor 6.4 in frequency.
    hz = np.asarray(hz, dtype=np.float64)
    log_part = 15.0 + np.log(np.maximum(hz, 1000.0) / 1000.0) * 27.0 / math.log(6.4)
    return np.where(hz >= 1000.0, log_part, hz * 3.0 / 200.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    log_part = 1000.0 * np.exp((mel - 15.0) * math.log(6.4) / 27.0)
    return np.where(mel >= 15.0, log_part, mel * 200.0 / 3.0)


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels: int) -> torch.Tensor:
    """Slaney mel filterbank for 16 kHz / N_FFT, shape (n_mels, N_FFT // 2 + 1).

    Triangles evenly spaced on the Slaney mel scale over 0..8000 Hz, each
    scaled to unit area (Slaney normalisation), as librosa.filters.mel and
    Whisper use. Cached per n_mels; treat the returned tensor as read-only.
    """
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)  # (n_freq,)
    # n_mels + 2 edges: filter i rises from edge i, peaks at i+1, falls to i+2.
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1)
    rising = (fft_hz - lo) / (mid - lo)  # (n_mels, n_freq)
    falling = (hi - fft_hz) / (hi - mid)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= 2.0 / (hi - lo)  # equal area, so wide high bands aren't louder
    return torch.from_numpy(weights).float()


def log_mel_spectrogram(
    audio: np.ndarray | torch.Tensor,
    n_mels: int = 80,
    padding: int = 0,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Whisper log-mel features of 16 kHz audio.

    ``audio`` is (T,) or batched (B, T). ``padding`` zero samples are appended
    first. Returns (n_mels, T' // HOP_LENGTH) or (B, n_mels, ...), where T' is
    the padded length; pass ``pad_or_trim(audio)`` to get Whisper's 3000
    frames. Values are log10 power, floored 8 decades below each example's
    peak and rescaled by (x + 4) / 4 to roughly [-1, 1].
    """
    if not isinstance(audio, torch.Tensor):
        audio = torch.from_numpy(np.asarray(audio))
    if audio.ndim not in (1, 2):
        raise ValueError(f"audio: expected shape (T,) or (B, T), got {tuple(audio.shape)}")
    audio = audio.to(device=device, dtype=torch.float32)
    if padding > 0:
        audio = F.pad(audio, (0, padding))

    window = torch.hann_window(N_FFT, device=audio.device)  # periodic, as Whisper
    # center=True reflect-pads N_FFT // 2 on both sides -> T // HOP + 1 frames.
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)  # (..., n_freq, frames+1)
    # The last frame is mostly reflected padding; Whisper drops it so that
    # 30 s gives exactly N_FRAMES frames.
    power = stft[..., :-1].abs() ** 2  # (..., n_freq, frames)

    mel = mel_filters(n_mels).to(audio.device) @ power  # (..., n_mels, frames)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    # Dynamic-range floor relative to each example's own peak, so a batched
    # call gives the same features as separate calls.
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


def encoder_frames(num_samples: int) -> int:
    """Encoder positions covering `num_samples` of real audio (2 mel frames of 160 samples each), 1..1500."""
    return min(N_FRAMES // ENCODER_STRIDE, max(1, math.ceil(num_samples / N_SAMPLES_PER_TOKEN)))


def mel_batch(
    clips: list, n_mels: int, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of 30-s encoder windows from clips (paths or 16-kHz float arrays), each cut or padded.

    Returns (mel (B, n_mels, 3000) in ``dtype`` on ``device``, frame_mask (B, 1500) bool, True on
    encoder frames that hold real audio rather than the zero padding). The features are computed in
    float32 and only then cast, so a batch is the same whatever ``dtype`` asks for downstream.
    """
    audio = [load_audio(c) if isinstance(c, (str, os.PathLike)) else np.asarray(c, np.float32) for c in clips]
    mel = log_mel_spectrogram(np.stack([pad_or_trim(a) for a in audio]), n_mels, device=device).to(dtype)
    n = torch.tensor([encoder_frames(min(len(a), N_SAMPLES)) for a in audio], device=mel.device)  # (B,)
    frame_mask = torch.arange(N_FRAMES // ENCODER_STRIDE, device=mel.device)[None, :] < n[:, None]  # (B, 1500)
    return mel, frame_mask
