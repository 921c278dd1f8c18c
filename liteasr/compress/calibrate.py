"""Calibration: stream speech through the encoder and keep float64 moments of activations.

Per encoder layer, four sites are observed with forward hooks: attn_in (the input shared by q, k
and v), out_in, fc1_in and fc2_out. The output moments of every linear follow exactly from these:
mean_y = W·mean_x + b and Cov(y) = W·Cov(x)·Wᵀ. Keeping the input side where it is narrower or
shared stores four d×d matrices per layer — 1.7 GB for large-v3 in float64 — and nothing grows
with the number of clips (the reference implementation stores every activation: ~110 GB).

`calibrate(..., layers=[i])` observes only layer i and stops the forward pass right after it:
sequential calibration compresses layer by layer, each calibrated on the already-compressed
layers' outputs.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..model import Whisper, dense_weight

MIN_CLIPS = 8  # fewer clips give covariance estimates dominated by one or two speakers
FRAME_POLICIES = ("audio", "all")  # statistics over frames of real audio, or over all 1500 (with padding)


class Moments:
    """Streaming float64 mean and covariance of row vectors; memory is O(d²) whatever the row count."""

    def __init__(self, d: int, device: torch.device | str = "cpu") -> None:
        self.n = 0
        self.sum = torch.zeros(d, dtype=torch.float64, device=device)
        self.gram = torch.zeros(d, d, dtype=torch.float64, device=device)

    def add(self, x: Tensor) -> None:  # x (N, d)
        x = x.to(torch.float64)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.gram.addmm_(x.T, x)

    @property
    def mean(self) -> Tensor:
        return self.sum / max(self.n, 1)

    @property
    def covariance(self) -> Tensor:
        mu = self.mean
        return self.gram / max(self.n, 1) - torch.outer(mu, mu)

    @property
    def nbytes(self) -> int:
        return self.sum.nbytes + self.gram.nbytes


@dataclass
class Calibration:
    """Moments of four sites per encoder layer: attn_in (input of q/k/v), out_in, fc1_in, fc2_out."""

    sites: dict[str, Moments]  # "encoder.layers.3.attn_in" -> Moments
    clip_ids: list[str]
    frame_policy: str  # one of FRAME_POLICIES
    seconds: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.sites.values())

    def covers(self, name: str) -> bool:
        """Whether the moments behind linear `name` ('encoder.layers.3.fc1', …) were collected."""
        prefix = name.split(".")[:3]
        return f"{'.'.join(prefix)}.attn_in" in self.sites

    def output_moments(self, name: str, layer: nn.Module) -> tuple[Tensor, Tensor]:
        """(mean (d_out,), covariance (d_out, d_out)) of linear `name`'s outputs, in float64."""
        prefix, _, leaf = name.rpartition(".")
        prefix = prefix.removesuffix(".self_attn")
        if leaf == "fc2":
            m = self.sites[f"{prefix}.fc2_out"]
            return m.mean, m.covariance
        site = {"out_proj": "out_in", "fc1": "fc1_in"}.get(leaf, "attn_in")
        m = self.sites[f"{prefix}.{site}"]
        w, b = dense_weight(layer)
        w = w.detach().to(m.gram.device, torch.float64)  # (out, in)
        mean = w @ m.mean + (b.detach().to(w) if b is not None else 0.0)
        return mean, w @ m.covariance @ w.T


class _Stop(Exception):
    """Raised by a hook after the last observed layer: the rest of the encoder is not needed."""


def _site_modules(model: Whisper, layers: list[int] | None = None) -> dict[str, tuple[nn.Module, str]]:
    """Site name -> (module, 'output' | 'input'): where each hook reads its activations."""
    sites = {}
    for i, layer in enumerate(model.encoder.layers):
        if layers is not None and i not in layers:
            continue
        p = f"encoder.layers.{i}"
        sites[f"{p}.attn_in"] = (layer.self_attn_layer_norm, "output")
        sites[f"{p}.out_in"] = (layer.self_attn.out_proj, "input")
        sites[f"{p}.fc1_in"] = (layer.final_layer_norm, "output")
        sites[f"{p}.fc2_out"] = (layer.fc2, "output")
    return sites


@torch.inference_mode()
def calibrate(model: Whisper, audio: list, frame_policy: str = "audio", batch_size: int = 8,
              progress: bool = True, ids: list[str] | None = None, layers: list[int] | None = None) -> Calibration:
    """Run calibration audio (paths or 16-kHz arrays) through the encoder and stream moments.

    frame_policy="audio" counts only encoder frames of real audio; "all" also the 30-s zero padding
    (the reference implementation's behaviour). `layers` restricts the observed layers (default
    all); the forward pass stops after the last of them. Hooks are always removed, even on error."""
    from tqdm import tqdm

    from ..audio import mel_batch

    if frame_policy not in FRAME_POLICIES:
        raise ValueError(f"frame_policy must be one of {FRAME_POLICIES}, not {frame_policy!r}")
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    d = model.dims.d_model
    sites = _site_modules(model, layers)
    stats = {name: Moments(d, device) for name in sites}
    mask: list[Tensor] = []  # the current batch's (B, T) frame mask, read by the hooks

    def hook_for(name: str, side: str):
        def hook(module, args, output=None):
            x = args[0] if side == "input" else output  # (B, T, d)
            stats[name].add(x[mask[0]])  # (N, d): only the selected frames
        return hook

    handles = []
    try:
        for name, (module, side) in sites.items():
            h = hook_for(name, side)
            handles.append(module.register_forward_pre_hook(h) if side == "input" else module.register_forward_hook(h))
        if layers is not None:
            def stop(module, args, output):
                raise _Stop
            handles.append(model.encoder.layers[max(layers)].register_forward_hook(stop))
        start = time.perf_counter()
        for i in tqdm(range(0, len(audio), batch_size), disable=not progress, desc="calibrate", unit="batch"):
            mel, frame_mask = mel_batch(audio[i: i + batch_size], model.dims.num_mel_bins, device, dtype)
            mask[:] = [frame_mask if frame_policy == "audio" else torch.ones_like(frame_mask)]
            try:
                model.encoder(mel)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    clip_ids = ids or [str(a) if isinstance(a, (str, os.PathLike)) else f"array{i}" for i, a in enumerate(audio)]
    return Calibration(stats, clip_ids, frame_policy, time.perf_counter() - start)


def select_calibration(source: str | os.PathLike, num_clips: int = 100, seed: int = 0) -> tuple[list[str], list[str]]:
    """Calibration audio from a manifest (a domain-stratified, seeded choice of `num_clips`) or a
    directory of audio files (the first `num_clips` by name). Returns (paths, ids); every clip is
    decoded once up front so that all unreadable clips are reported together, before any work."""
    from ..audio import load_audio
    from ..eval import read_manifest, split_clips

    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a"))
        paths, ids = [str(p) for p in files[:num_clips]], [p.stem for p in files[:num_clips]]
    else:
        clips = read_manifest(src)
        chosen = clips if num_clips >= len(clips) else split_clips(clips, num_clips / len(clips), seed)[0][:num_clips]
        if len(chosen) < min(num_clips, len(clips)):  # per-domain rounding fell short: top up, seeded
            taken = {c.id for c in chosen}
            rest = [c for c in clips if c.id not in taken]
            random.Random(f"{seed}:top-up").shuffle(rest)
            extra = {c.id for c in rest[: num_clips - len(chosen)]}
            chosen = [c for c in clips if c.id in taken or c.id in extra]
        paths, ids = [str(c.audio) for c in chosen], [c.id for c in chosen]
    if len(paths) < MIN_CLIPS:
        raise ValueError(f"{source}: calibration set has {len(paths)} clips; at least {MIN_CLIPS} are needed")
    bad = []
    for p in paths:
        try:
            load_audio(p)
        except (OSError, ValueError) as e:
            bad.append(str(e))
    if bad:
        raise ValueError(f"{source}: {len(bad)} unreadable calibration clip(s):\n  " + "\n  ".join(bad))
    return paths, ids
