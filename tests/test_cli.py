"""The `liteasr` command line, run as a user runs it (`python -m liteasr ...` in a subprocess):
output to stdout and files; a bad input -> one 'liteasr: error: ...' line naming the culprit and no
output of its own, while every good input of the same run is still transcribed and written; exit 1."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from liteasr.eval import Clip, score
from liteasr.fetch import fetch_model

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # generous: a cold start on a busy 2-core machine can take a minute


def run_cli(*args, threads: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, "-m", "liteasr", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The single error line: stderr must be exactly one 'liteasr: error: …' line, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    print(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("liteasr: error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def jfk_path(speech_dev) -> Path:
    return next(r["path"] for r in speech_dev if r["id"] == "jfk_inaugural")


@pytest.fixture(scope="module")
def second_path(check_clips) -> Path:
    return check_clips[1]["path"]  # a short ARCTIC prompt


# ---------------------------------------------------------------------------------------------------
# working runs


def test_transcribe_prints_text(tiny_en, jfk_path):
    proc = run_cli("transcribe", jfk_path, "--no-progress")  # default model: tiny.en by name
    assert proc.returncode == 0, proc.stderr
    expected = tiny_en.transcribe(str(jfk_path), beam_size=5, best_of=5)["text"]  # the CLI's decoding defaults
    assert proc.stdout.strip() == expected
    assert "ask not what your country can do for you" in expected.lower()


def test_transcribe_int8(tiny_en, jfk_path):
    """--int8 runs liteasr.quantize.int8_model's copy: the same words as the float32 model on JFK."""
    from liteasr.eval import normalize

    proc = run_cli("transcribe", jfk_path, "--no-progress", "--int8")
    assert proc.returncode == 0, proc.stderr
    assert normalize(proc.stdout) == normalize(tiny_en.transcribe(str(jfk_path))["text"])


def test_all_formats_written(hf_dir_tiny, jfk_path, second_path, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("transcribe", jfk_path, second_path, "-m", hf_dir_tiny, "-f", "all", "-o", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()  # several files: "path: text" per file
    assert len(lines) == 2 and lines[0].startswith(f"{jfk_path}: ") and lines[1].startswith(f"{second_path}: ")
    stems = [jfk_path.stem, second_path.stem]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.{f}" for s in stems for f in ("txt", "json", "srt", "vtt"))
    for stem, line in zip(stems, lines):
        result = json.loads((out / f"{stem}.json").read_text(encoding="utf-8"))
        assert line.split(": ", 1)[1] == result["text"] and result["text"]
        assert (out / f"{stem}.txt").read_text(encoding="utf-8") == result["text"] + "\n"
        srt = (out / f"{stem}.srt").read_text(encoding="utf-8")
        vtt = (out / f"{stem}.vtt").read_text(encoding="utf-8")
        # srt/vtt requested -> decoded with timestamps: real segment times, not 0..duration placeholders
        assert result["segments"] and all(0 <= s["start"] <= s["end"] <= result["duration"] + 1e-6
                                          for s in result["segments"])
        assert srt.startswith("1\n00:00:") and len(re.findall(r"^\d+$", srt, re.M)) == len(result["segments"])
        assert vtt.startswith("WEBVTT\n\n") and vtt.count(" --> ") == len(result["segments"])
    assert "ask not what your country" in (out / f"{jfk_path.stem}.txt").read_text().lower()


def test_eval_writes_reports(tiny_en, speech_dev, hf_dir_tiny, tmp_path):
    rows = [r for r in speech_dev if r["id"] in ("jfk_inaugural", "ljspeech_LJ001-0015")]
    manifest = rows[0]["path"].parent.parent / "manifest.jsonl"
    report = tmp_path / "reports" / "tiny.json"
    proc = run_cli("eval", "-m", hf_dir_tiny, "--manifest", manifest, "--ids", ",".join(r["id"] for r in rows),
                   "--output", report, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    md = report.with_suffix(".md").read_text()
    overall = data["overall"]
    assert overall["n"] == 2 and overall["metric"] == "wer" and overall["ref_units"] > 20
    assert {u["id"] for u in data["utterances"]} == {r["id"] for r in rows}
    # Same WER as scoring the in-process transcripts of the same model.
    clips = [Clip(r["id"], r["path"], r["text"], r["domain"], "en", r["duration_s"]) for r in rows]
    expected = score(clips, [tiny_en.transcribe(str(r["path"]))["text"] for r in rows])["overall"]
    assert overall["errors"] == expected["errors"] and overall["error_rate"] == pytest.approx(expected["error_rate"])
    row = f"| **overall** | 2 | {overall['hours']:.3f} | {overall['ref_units']} | {100 * overall['error_rate']:.2f} |"
    assert "WER %" in md and row in md and row in proc.stdout
    assert f"wrote {report}" in proc.stdout


def test_eval_limit_covers_every_domain(hf_dir_tiny, second_path, tmp_path):
    """`--limit N` takes one clip per domain before a second from any: the first N of a manifest
    grouped by domain would all come from its first domain."""
    shutil.copy(second_path, tmp_path / "a.wav")
    domains = ["big"] * 9 + ["one", "two", "three"]
    rows = [{"id": f"c{i}", "audio": "a.wav", "text": "x", "domain": d, "duration_s": 2.0} for i, d in enumerate(domains)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("eval", "-m", hf_dir_tiny, "--manifest", tmp_path / "m.jsonl", "--limit", "5",
                   "--output", tmp_path / "r.json", "--no-progress", threads=1)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["overall"]["n"] == 5 and set(data["by_domain"]) == {"big", "one", "two", "three"}


def test_eval_unknown_id(speech_dev, tmp_path):
    manifest = speech_dev[0]["path"].parent.parent / "manifest.jsonl"
    proc = run_cli("eval", "--manifest", manifest, "--ids", "jfk_inaugural,no_such_clip",
                   "--output", tmp_path / "r.json", "--no-progress", threads=1)
    assert proc.returncode == 1
    assert "no_such_clip" in _error_line(proc)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# bad inputs: all cases are run concurrently once (each subprocess only loads a model and fails)

BAD_CASES = ["missing file", "corrupt audio", "zero-length wav", "nan wav", "directory as audio",
             "model dir without checkpoint", "model path is a file", "ct2 missing part2",
             "bad file among good (middle)", "bad file among good (last)", "bad file among good, --on-error fail"]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, hf_dir_tiny, jfk_path, second_path) -> dict:
    root = tmp_path_factory.mktemp("cli-bad")
    missing = root / "missing.wav"
    corrupt = root / "corrupt.wav"
    corrupt.write_text("this is not audio\n")
    empty = root / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    nan = root / "nan.wav"
    x = np.random.default_rng(0).uniform(-0.1, 0.1, 16000).astype(np.float32)
    x[1234] = np.nan
    sf.write(nan, x, 16000, subtype="FLOAT")
    audio_dir = root / "audio_dir"
    audio_dir.mkdir()
    not_ckpt = root / "not_a_model"
    not_ckpt.mkdir()
    (not_ckpt / "README.md").write_text("nothing here\n")
    model_file = root / "model.safetensors"
    model_file.write_bytes(b"\0" * 64)
    ct2 = root / "base-part1-only"  # a split CTranslate2 model whose second part is missing
    ct2.mkdir()
    src = fetch_model("base", quiet=True)
    for name in ("model.bin.part1", "config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(src / name, ct2 / name)

    good = [jfk_path, second_path]
    cases = {  # name -> (arguments, model, what the error must name)
        "missing file": ([missing], hf_dir_tiny, missing),
        "corrupt audio": ([corrupt], hf_dir_tiny, corrupt),
        "zero-length wav": ([empty], hf_dir_tiny, empty),
        "nan wav": ([nan], hf_dir_tiny, nan),
        "directory as audio": ([audio_dir], hf_dir_tiny, audio_dir),
        "model dir without checkpoint": ([jfk_path], not_ckpt, not_ckpt),
        "model path is a file": ([jfk_path], model_file, model_file),
        "ct2 missing part2": ([jfk_path], ct2, "model.bin.part2"),
        "bad file among good (middle)": ([good[0], corrupt, good[1]], hf_dir_tiny, corrupt),
        "bad file among good (last)": (good + [nan], hf_dir_tiny, nan),
        "bad file among good, --on-error fail": ([corrupt] + good, hf_dir_tiny, corrupt),
    }
    assert list(cases) == BAD_CASES

    def run(name):
        files, model, culprit = cases[name]
        out = root / f"out-{BAD_CASES.index(name)}"
        # -f all -o: would write every format if anything got through. One thread each: they run
        # side by side and do no heavy compute before failing.
        extra = ["--on-error", "fail"] if name.endswith("--on-error fail") else []
        proc = run_cli("transcribe", *files, "-m", model, "-f", "all", "-o", out, "--no-progress", *extra,
                       threads=1)
        return proc, out, str(culprit), files

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(BAD_CASES, pool.map(run, BAD_CASES)))


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input(bad_runs, case):
    proc, out, culprit, files = bad_runs[case]
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    print(proc.stderr)
    assert lines[0].startswith("liteasr: error: ") and culprit in lines[0]
    good = [f for f in files if str(f) != culprit]
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if "among good" not in case:  # one bad input: one error line, nothing written or printed
        assert len(lines) == 1 and written == [] and proc.stdout == ""
        return
    assert culprit in lines[-1] and f"1 of {len(files)} inputs failed" in lines[-1]
    assert not any(Path(culprit).stem in name for name in written)  # nothing of the bad input
    if case.endswith("--on-error fail"):  # stopped at the bad (first) input
        assert "stopped there" in lines[-1]
        return
    # every good input transcribed and written in every format, atomically (no temporary files left)
    assert written == sorted(f"{Path(f).stem}.{fmt}" for f in good for fmt in ("json", "srt", "txt", "vtt"))
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == [str(f) for f in good]


def test_transcribe_format_to_stdout(tiny_en, jfk_path, second_path):
    """-f srt without -o prints SubRip to stdout (not plain text); formats that would mix files are refused."""
    proc = run_cli("transcribe", jfk_path, "-m", "tiny.en", "-f", "srt", "--no-progress", threads=1)
    assert proc.returncode == 0, proc.stderr
    assert re.match(r"1\n00:00:\d\d,\d{3} --> 00:00:\d\d,\d{3}\n\S", proc.stdout), proc.stdout
    proc = run_cli("transcribe", jfk_path, second_path, "-m", "tiny.en", "-f", "srt", "--no-progress")
    assert proc.returncode == 1 and "--output-dir" in _error_line(proc)
    proc = run_cli("transcribe", jfk_path, "-m", "tiny.en", "-f", "all", "--no-progress")
    assert proc.returncode == 1 and "--output-dir" in _error_line(proc)


# ---------------------------------------------------------------------------------------------------
# compress


def test_compress_cli_output_determinism_and_refusals(speech_dev, tmp_path):
    """`liteasr compress` writes a self-contained lite-whisper directory plus compression.json; the
    same inputs give bit-identical weights; an existing output or a malformed θ is refused with
    nothing written."""
    manifest = speech_dev[0]["path"].parent.parent / "manifest.jsonl"
    args = ["compress", "-m", "tiny.en", "--calibration", manifest, "--num-clips", "8", "--preset", "a", "--no-progress"]
    outs = [tmp_path / "one", tmp_path / "two"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda o: run_cli(*args, "-o", o, threads=1), outs))
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
    one, two = outs
    names = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
             "preprocessor_config.json", "tokenizer_config.json", "compression.json"}
    assert names <= {p.name for p in one.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    report = json.loads((one / "compression.json").read_text())
    plans = [{k: v for k, v in json.loads((o / "compression.json").read_text())["plan"].items()
              if k != "calibration_s"} for o in outs]  # everything but the wall time
    assert plans[0] == plans[1]
    assert len(report["calibration"]) == 8 and 0 < report["linear_fraction"] < 1
    assert json.loads((one / "config.json").read_text())["model_type"] == "lite-whisper"
    assert "encoder" in procs[0].stdout  # the rank table is printed

    again = run_cli(*args, "-o", one, threads=1)
    assert again.returncode == 1 and str(one) in _error_line(again) and "--overwrite" in again.stderr
    assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()

    bad = run_cli(*args[:-3], "--threshold", "0.99:abc", "-o", tmp_path / "bad", threads=1)
    assert bad.returncode == 1 and "0.99:abc" in _error_line(bad)
    assert not (tmp_path / "bad").exists()


def test_version():
    import liteasr

    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"liteasr {liteasr.__version__}"
