"""Longer recovery (distillation) of a compressed encoder on a GPU machine that has no network, no
../shared and no libsndfile: the sweep's point, compressed here, distilled there, judged here.

    # here (CPU): compress exactly as the sweep did and bundle the teacher, the student's factors and the clips
    .venv/bin/python benchmarks/recover_gpu.py prepare --sweep docs/results/sweep-base --model base \\
        --target-size 0.6 --out .gpu/rec
    # there (GPU): distil with liteasr.compress.recover.distill, checkpoints at the given steps (fp16 factors in $OUT)
    PYTHONPATH=. python3 benchmarks/recover_gpu.py run --bundle .gpu/rec --teacher-dir .gpu/rect \\
        --checkpoints 100 300 1000 --out $OUT
    # here: put each checkpoint in, apply recover's keep-the-better rule on the held-out calibration
    # clips, evaluate on the sweep's held-out evaluation clips
    .venv/bin/python benchmarks/recover_gpu.py judge --sweep docs/results/sweep-base --model base \\
        --bundle .gpu/rec --results DIR --json docs/results/recover-gpu-base-0.6.json

`prepare` compresses with the sweep's own call (`liteasr.compress(..., CompressConfig(budget=Budget("size", f),
sequential=True))` on the sweep's calibration clips, in the sweep's order; deterministic, so its
step-0 held-out WER must equal the sweep's row) and keeps the starting factors in float32, from
which `judge` rebuilds the starting point. The split is recover()'s: the first 75 % of the
calibration clips train, the last 25 % judge (never trained on); the sweep's evaluation clips are
used only for the final numbers. The teacher's encoder weights are the real fp16 ones (exact) and
travel apart from the rest (two calls), since the two together exceed one call's 64 MiB. Audio
travels as int16 (the clips are 16-bit FLAC, so this is exactly what `load_audio` returns).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

import pcm  # benchmarks/pcm.py

SPEECH_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speech-dev" / "manifest.jsonl"
VAL_FRACTION = 0.25  # recover()'s default


def _split(n: int) -> int:
    return n - max(1, int(n * VAL_FRACTION))  # number of training clips


def _compressed(args):
    """(dense model, compressed copy, calibration clips) exactly as `liteasr sweep` built the point."""
    import liteasr
    from liteasr.compress import Budget, CompressConfig
    from liteasr.eval import read_manifest

    sweep = json.loads((Path(args.sweep) / "sweep.json").read_text())
    ids = sweep["calibration"]
    clips = {c.id: c for c in read_manifest(args.manifest, ids=ids)}
    clips = [clips[i] for i in ids]
    dense = liteasr.load_model(args.model, "cpu", torch.float32)
    student = copy.deepcopy(dense)
    config = CompressConfig(budget=Budget("size", args.target_size), sequential=True, progress=False)
    liteasr.compress(student, [str(c.audio) for c in clips], config)
    return dense, student, clips, sweep


def _factor_state(model) -> dict[str, torch.Tensor]:
    from liteasr.model import LowRankLinear

    return {f"{name}.{p}": t.detach().contiguous() for name, m in model.encoder.named_modules()
            if isinstance(m, LowRankLinear) for p, t in m.named_parameters()}


def prepare(args) -> None:
    from safetensors.torch import save_file

    from liteasr.audio import load_audio

    dense, student, clips, _ = _compressed(args)
    out, tdir = Path(args.out), Path(args.out + "t")
    out.mkdir(parents=True, exist_ok=True)
    tdir.mkdir(parents=True, exist_ok=True)
    enc = {k: v.half() for k, v in dense.encoder.state_dict().items()}
    if any(not torch.equal(v.float(), dense.encoder.state_dict()[k]) for k, v in enc.items()):
        raise SystemExit("the dense encoder is not exactly float16: it would not travel exactly")
    save_file(enc, str(tdir / "teacher_encoder.safetensors"))
    save_file(_factor_state(student), str(out / "student_factors.safetensors"))
    arrays = [load_audio(c.audio) for c in clips]
    pcm.save(out / "audio.npz", arrays, [str(c.audio) for c in clips])
    meta = {"dims": dense.dims.__dict__, "low_rank_config": student.low_rank_config, "ids": [c.id for c in clips],
            "n_train": _split(len(clips))}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"bundle {out} (+ teacher in {tdir}): {len(clips)} clips, {meta['n_train']} train")


def run(args) -> None:
    from safetensors.torch import load_file, save_file

    from liteasr.model import Dims, Whisper
    from liteasr.compress.recover import distill

    bundle = Path(args.bundle)
    meta = json.loads((bundle / "meta.json").read_text())
    dims = Dims(**meta["dims"])
    teacher_enc = {k: v.float() for k, v in load_file(str(Path(args.teacher_dir) / "teacher_encoder.safetensors")).items()}
    teacher, student = Whisper(dims), Whisper(dims, meta["low_rank_config"])
    teacher.encoder.load_state_dict(teacher_enc)
    shared = {k: v for k, v in teacher_enc.items() if k in student.encoder.state_dict()
              and student.encoder.state_dict()[k].shape == v.shape}
    factors = load_file(str(bundle / "student_factors.safetensors"))
    missing = set(student.encoder.state_dict()) - set(shared) - set(factors)
    if missing:
        raise SystemExit(f"student encoder tensors missing from the bundle: {sorted(missing)[:5]}")
    student.encoder.load_state_dict({**shared, **factors})
    dev = torch.device(args.device)
    teacher, student = teacher.to(dev).eval(), student.to(dev).eval()
    audio = pcm.load(bundle / "audio.npz")
    train, val = audio[: meta["n_train"]], audio[meta["n_train"]:]
    out = Path(args.out)
    report, done, t0 = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "checkpoints": []}, 0, time.perf_counter()
    for i, step in enumerate(sorted(args.checkpoints)):
        # one distill call per segment, each with its own seed: the sampling stream differs from one long
        # call, but every checkpoint is a deterministic function of the bundle and the checkpoint list
        losses = distill(student, teacher, train, step - done, lr=args.lr, batch_size=args.batch_size, seed=i, progress=False)
        done = step
        val_loss = _val_loss(student, teacher, val)
        state = {k: v.half().cpu() for k, v in _factor_state(student).items()}
        save_file(state, str(out / f"step{step}.safetensors"))  # fp16, the published format's dtype
        report["checkpoints"].append({"step": step, "train_loss_last10": float(np.mean(losses[-10:])),
                                      "val_loss": val_loss, "seconds": time.perf_counter() - t0})
        print(report["checkpoints"][-1], flush=True)
        (out / "run.json").write_text(json.dumps(report, indent=1))  # after every checkpoint: a time-out keeps the rest


@torch.no_grad()
def _val_loss(student, teacher, clips: list[np.ndarray]) -> float:
    """recover's loss on held-out clips, all at once: relative squared error on frames of real audio."""
    from liteasr.audio import N_SAMPLES, encoder_frames, log_mel_spectrogram, pad_or_trim

    dev = next(student.parameters()).device
    num = den = 0.0
    for c in clips:
        mel = log_mel_spectrogram(pad_or_trim(c)[None], student.dims.num_mel_bins, device=dev)
        n = encoder_frames(min(len(c), N_SAMPLES))
        t, s = teacher.encoder(mel)[:, :n], student.encoder(mel)[:, :n]
        num += (s - t).pow(2).sum().item()
        den += t.pow(2).sum().item()
    return num / den


def _student_from_bundle(bundle: Path, dense):
    """The compressed starting point that `prepare` bundled: dense's weights plus the fp32 factors."""
    from safetensors.torch import load_file

    from liteasr.model import Whisper

    meta = json.loads((bundle / "meta.json").read_text())
    student = Whisper(dense.dims, meta["low_rank_config"]).eval()
    state = {k: v for k, v in dense.state_dict().items() if k in student.state_dict()
             and student.state_dict()[k].shape == v.shape}
    state.update({f"encoder.{k}": v for k, v in load_file(str(bundle / "student_factors.safetensors")).items()})
    student.load_state_dict(state)
    student.tokenizer, student.config = dense.tokenizer, dense.config
    return student, meta


def judge(args) -> None:
    from safetensors.torch import load_file

    import liteasr
    from liteasr.eval import read_manifest
    import functools

    from liteasr.compress.recover import wer
    from liteasr.eval import evaluate, transcribe_clips

    sweep = json.loads((Path(args.sweep) / "sweep.json").read_text())
    dense = liteasr.load_model(args.model, "cpu", torch.float32)
    student, meta = _student_from_bundle(Path(args.bundle), dense)
    clips = {c.id: c for c in read_manifest(args.manifest, ids=meta["ids"])}
    clips = [clips[i] for i in meta["ids"]]
    n_train = _split(len(clips))
    val, val_refs = [str(c.audio) for c in clips[n_train:]], [c.text for c in clips[n_train:]]
    ev = {c.id: c for c in read_manifest(args.manifest, ids=sweep["evaluation"])}
    ev = [ev[i] for i in sweep["evaluation"]]
    run_report = json.loads((Path(args.results) / "run.json").read_text())

    def held_out(model) -> dict:  # exactly the sweep's evaluation (language from the manifest, batch 8)
        rep = evaluate(functools.partial(transcribe_clips, model, batch_size=8), ev, batch_size=8, progress=False)
        return {"wer": rep["overall"]["error_rate"]}

    rows = [{"step": 0, "val_wer": wer(student, val, val_refs), **held_out(student)}]
    for ck in run_report["checkpoints"]:
        m = copy.deepcopy(student)
        state = {k: v.float() for k, v in load_file(str(Path(args.results) / f"step{ck['step']}.safetensors")).items()}
        m.encoder.load_state_dict(state, strict=False)
        rows.append({"step": ck["step"], "val_loss": ck["val_loss"], "val_wer": wer(m, val, val_refs), **held_out(m)})
        print(rows[-1], flush=True)
    best = min(rows, key=lambda r: (r["val_wer"], -r["step"]))  # recover's rule: never worse on the val split
    dense_wer = next(r["wer"] for r in sweep["rows"] if r["label"] == "dense")
    report = {"model": args.model, "low_rank_config": meta["low_rank_config"], "device": run_report["device"],
              "dense_wer": dense_wer, "rows": rows, "chosen_step": best["step"], "chosen_wer": best["wer"],
              "rule": "the checkpoint with the lowest WER on the held-out calibration clips (ties: the later one); "
                      "step 0 = no recovery", "run": run_report}
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"dense {100 * dense_wer:.2f} %; " + "; ".join(
        f"step {r['step']}: val {100 * r['val_wer']:.2f} %, held-out {100 * r['wer']:.2f} %" for r in rows)
        + f"; chosen step {best['step']}: {100 * best['wer']:.2f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("prepare", "judge"):
        p = sub.add_parser(name)
        p.add_argument("--sweep", required=True, help="the sweep directory (its calibration and evaluation ids)")
        p.add_argument("--model", required=True)
        p.add_argument("--manifest", default=str(SPEECH_DEV))
        if name == "prepare":
            p.add_argument("--target-size", type=float, required=True)
            p.add_argument("--out", required=True, help="bundle folder; the teacher goes to OUT + 't'")
        else:
            p.add_argument("--bundle", required=True, help="prepare's bundle (the starting point's factors)")
            p.add_argument("--results", required=True, help="the folder of run's files")
            p.add_argument("--json", required=True)
    r = sub.add_parser("run")
    r.add_argument("--bundle", required=True)
    r.add_argument("--teacher-dir", required=True)
    r.add_argument("--checkpoints", type=int, nargs="+", required=True)
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--batch-size", type=int, default=4)
    r.add_argument("--device", default="cuda")
    r.add_argument("--out", required=True)
    args = ap.parse_args()
    {"prepare": prepare, "run": run, "judge": judge}[args.cmd](args)


if __name__ == "__main__":
    main()
