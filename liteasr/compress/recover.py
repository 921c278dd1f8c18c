"""Recovery: a short distillation of the factored encoder toward the dense encoder's outputs.

Only the factors and biases of LowRankLinear layers train; everything else, the decoder included,
stays frozen, so the result is still a lite-whisper checkpoint. The loss is the mean-squared error
between student and teacher encoder outputs on frames of real audio, relative to the teacher's
output power. Unlabelled calibration audio is enough. Held-out clips (never trained on) are
transcribed before and after: if the word error rate got worse, the pre-recovery weights are put back.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch

from ..model import LowRankLinear, Whisper


def wer(model: Whisper, audio: list, refs: list[str]) -> float:
    """Corpus WER of `model`'s transcripts of `audio` (paths or arrays) against `refs`, both normalised;
    clips whose normalised reference is empty are left out."""
    import jiwer

    from ..eval import normalize

    hyps = [normalize(r["text"]) for r in model.transcribe(audio, batch_size=8)]
    refs = [normalize(r) for r in refs]
    keep = [i for i, r in enumerate(refs) if r]
    return jiwer.wer([refs[i] for i in keep], [hyps[i] for i in keep])


def recover(student: Whisper, teacher: Whisper, audio: list, steps: int = 50, lr: float = 1e-4,
            batch_size: int = 4, val_fraction: float = 0.25, refs: list[str] | None = None,
            seed: int = 0, progress: bool = True) -> dict:
    """Distil `student` (factored, modified in place) toward `teacher` (dense) on `audio` for `steps`.

    The last `val_fraction` of `audio` is held out of training; its WER is measured before and
    after against `refs` (transcripts aligned with `audio`) or, without them, against the teacher's
    own transcripts. Returns a report; keeps the better of before/after."""
    n_val = max(1, int(len(audio) * val_fraction))
    train, val = audio[:-n_val], audio[-n_val:]
    val_refs = refs[-n_val:] if refs is not None else [r["text"] for r in teacher.transcribe(val, batch_size=8)]
    before = wer(student, val, val_refs)
    saved = copy.deepcopy(student.state_dict())
    losses = distill(student, teacher, train, steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    after = wer(student, val, val_refs)
    kept = after <= before
    if not kept:
        student.load_state_dict(saved)
    return {"steps": steps, "references": "manifest" if refs is not None else "dense model's transcripts", "lr": lr, "batch_size": batch_size, "train_clips": len(train), "val_clips": len(val),
            "loss_first": losses[0], "loss_last": losses[-1], "val_wer_before": before, "val_wer_after": after,
            "kept": kept}


def distill(student: Whisper, teacher: Whisper, audio: list, steps: int, lr: float = 1e-4, batch_size: int = 4,
            seed: int = 0, progress: bool = True) -> list[float]:
    """The training loop of `recover`, without its held-out check: `steps` Adam steps on the factors and
    biases of `student`'s LowRankLinear layers (everything else frozen), each on `batch_size` clips of
    `audio` (paths or 16-kHz arrays) drawn without replacement. Loss: squared error of the encoder
    output (B, 1500, d) on frames of real audio, relative to the teacher's output power there.
    Returns the loss of every step; `student` is left in eval mode with no parameter requiring grad."""
    from tqdm import tqdm

    from ..audio import load_audio, mel_batch

    params = [p for m in student.encoder.modules() if isinstance(m, LowRankLinear) for p in m.parameters()]
    if not params:
        raise ValueError("recovery needs a compressed model: the encoder has no factored layers")
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    cache: dict[int, np.ndarray] = {}
    device, dtype = params[0].device, params[0].dtype
    losses = []
    student.train()
    try:
        for _ in tqdm(range(steps), disable=not progress, desc="recover"):
            idx = rng.choice(len(audio), size=min(batch_size, len(audio)), replace=False)
            for i in idx:
                if i not in cache:
                    a = audio[i]
                    cache[i] = load_audio(a) if isinstance(a, (str, os.PathLike)) else np.asarray(a, np.float32)
            clips = [cache[i] for i in idx]
            mel, frame_mask = mel_batch(clips, student.dims.num_mel_bins, device, dtype)
            mask = frame_mask[..., None]  # (B, 1500, 1)
            with torch.no_grad():
                target = teacher.encoder(mel)  # (B, 1500, d)
            out = student.encoder(mel)
            loss = ((out - target).pow(2) * mask).sum() / (target.pow(2) * mask).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        student.eval()
        for p in student.parameters():
            p.requires_grad_(False)
    return losses
