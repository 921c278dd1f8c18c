"""CPU: liteasr fp32 and dynamic int8 (liteasr.quantize.int8_model), dense and compressed, next to faster-whisper int8 on
the same clips, in one run: RTFx and corpus WER.

    .venv/bin/python benchmarks/cpu_int8.py --dense base --compressed out/base-lite-c --clips 40 --threads 2 \
        --rounds 3 --json docs/results/cpu-int8-base.json

Every system transcribes the same 16-kHz arrays (decoded before timing), greedy, without timestamps, English forced
on multilingual models, batch size --batch-size for liteasr (faster-whisper's WhisperModel.transcribe goes clip by
clip, beam_size=1, without VAD, without previous-text conditioning). Rounds are interleaved and the system order
flips every round; the median per system is reported. faster-whisper loads the dense model's CTranslate2 directory
(liteasr fetch keeps it; compute_type int8) with cpu_threads = --threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import liteasr
from liteasr.audio import SAMPLE_RATE, load_audio
from liteasr.eval import score
from liteasr.quantize import int8_model

from cpu_vs_transformers import SPEECH_DEV, select_clips


def ct2_dir(path: Path) -> str:
    """The CTranslate2 directory faster-whisper can load: PyPI-packaged models split model.bin into
    model.bin.part1, part2, … (liteasr.ct2 reads either); CTranslate2 wants one file, so join them once into a
    sibling directory."""
    if (path / "model.bin").exists():
        return str(path)
    joined = path.parent / (path.name + "-ct2-joined")
    if not (joined / "model.bin").exists():
        import shutil

        joined.mkdir(exist_ok=True)
        for f in path.iterdir():
            if not f.name.startswith("model.bin") and f.is_file():
                shutil.copy(f, joined / f.name)
        parts = sorted(path.glob("model.bin.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
        tmp = joined / "model.bin.tmp"
        with open(tmp, "wb") as out:
            for p in parts:
                out.write(p.read_bytes())
        tmp.rename(joined / "model.bin")
    return str(joined)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="base")
    ap.add_argument("--compressed", required=True)
    ap.add_argument("--clips", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--systems", nargs="+", default=None, help="subset of the systems to run")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clips = select_clips(SPEECH_DEV, a.clips)
    arrays = [load_audio(c.audio) for c in clips]
    audio_s = sum(len(x) for x in arrays) / SAMPLE_RATE

    dense = liteasr.load_model(a.dense, "cpu", torch.float32)
    comp = liteasr.load_model(a.compressed, "cpu", torch.float32)
    forced = {"language": "en", "task": "transcribe"} if dense.is_multilingual else {}
    models = {"liteasr fp32": dense, "liteasr int8": int8_model(dense), "liteasr compressed fp32": comp,
              "liteasr compressed int8": int8_model(comp)}

    def lite(m):
        return lambda xs: [r["text"] for r in m.transcribe(xs, batch_size=a.batch_size, **forced)]

    systems = {k: lite(m) for k, m in models.items()}
    try:
        from faster_whisper import WhisperModel

        from liteasr.fetch import fetch_model

        fw = WhisperModel(ct2_dir(Path(fetch_model(a.dense, quiet=True))), device="cpu", compute_type="int8",
                          cpu_threads=a.threads)

        def run_fw(xs):
            out = []
            for x in xs:
                segs, _ = fw.transcribe(x, beam_size=1, language="en" if forced else None, without_timestamps=True,
                                        condition_on_previous_text=False, vad_filter=False)
                out.append(" ".join(s.text.strip() for s in segs))
            return out

        systems["faster-whisper int8"] = run_fw
    except ImportError as e:
        print(f"faster-whisper not installed ({e}): skipped")
    if a.systems:
        systems = {k: v for k, v in systems.items() if k in a.systems}
    for run in systems.values():  # warm-up
        run(arrays[:2])
    walls = {k: [] for k in systems}
    texts = {}
    names = list(systems)
    load = [os.getloadavg()[0]]
    for r in range(a.rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            texts[k] = systems[k](arrays)
            walls[k].append(time.perf_counter() - t)
            print(f"round {r + 1} {k}: {walls[k][-1]:.1f} s", flush=True)
        load.append(os.getloadavg()[0])
    rows = {}
    for k in systems:
        w = statistics.median(walls[k])
        rows[k] = dict(wall_s=w, walls_s=walls[k], rtfx=audio_s / w, wer=100 * score(clips, texts[k])["overall"]["error_rate"],
                       texts=texts[k])
    print(f"\n{len(clips)} speech-dev clips, {audio_s:.0f} s of audio, {a.threads} threads, median of {a.rounds} "
          f"interleaved rounds; load average {', '.join(f'{x:.1f}' for x in load)}\n")
    print("| system | wall s (median) | runs s | RTFx | vs faster-whisper int8 | WER % |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    fw_rtfx = rows.get("faster-whisper int8", {}).get("rtfx")
    for k, r in rows.items():
        ratio = f"{r['rtfx'] / fw_rtfx:.2f}x" if fw_rtfx else ""
        print(f"| {k} | {r['wall_s']:.1f} | {' / '.join(f'{x:.1f}' for x in r['walls_s'])} | {r['rtfx']:.2f} | "
              f"{ratio} | {r['wer']:.2f} |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(dict(clips=[c.id for c in clips], audio_s=audio_s, threads=a.threads,
                                                rounds=a.rounds, load=load, systems=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
