"""Fast CPU tests for liteasr.eval (no model involved)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from liteasr.eval import (Clip, evaluate, format_table, normalize, read_manifest, read_split,
                          score, split_clips, spread, transcribe_clips, write_report)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DEV_MANIFEST = SHARED / "data" / "speech-dev" / "manifest.jsonl"


@pytest.fixture(scope="module")
def dev_manifest() -> Path:
    if not DEV_MANIFEST.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"shared data missing in CI: {DEV_MANIFEST}")
        pytest.skip(f"shared data not available: {DEV_MANIFEST}")
    return DEV_MANIFEST


def clip(i: int, text: str, domain: str = "d", lang: str = "en", dur: float = 2.0) -> Clip:
    return Clip(id=f"c{i}", audio=Path(f"/nonexistent/c{i}.flac"), text=text, domain=domain,
                lang=lang, duration=dur)


# --- scoring -------------------------------------------------------------------------------

def test_corpus_wer_not_mean_of_utterances() -> None:
    clips = [clip(0, "a b c d"), clip(1, "e f")]
    rep = score(clips, ["a x c d", "e f g"])
    o = rep["overall"]
    assert (o["sub"], o["del"], o["ins"], o["ref_units"]) == (1, 0, 1, 6)
    assert o["error_rate"] == pytest.approx(2 / 6)
    per_utt = [u["error_rate"] for u in rep["utterances"]]
    assert per_utt == pytest.approx([1 / 4, 1 / 2])
    assert o["error_rate"] != pytest.approx(sum(per_utt) / 2)  # mean would be 0.375
    assert rep["utterances"][0]["hyp_norm"] == "a x c d"


def test_normalisation_removes_case_and_punctuation() -> None:
    rep = score([clip(0, "Hello, World!")], ["hello world"])
    assert rep["overall"]["errors"] == 0 and rep["overall"]["error_rate"] == 0.0


@pytest.mark.parametrize("ref,hyp", [
    ("The colour of the sky", "the color of the sky"),      # British -> American spelling
    ("twenty five dollars", "$25"),                          # spelled-out numbers/currency
    ("ten percent", "10%"),
    ("Mr. Smith arrived", "mister smith arrived"),           # abbreviations expanded
])
def test_english_normaliser_equivalences(ref: str, hyp: str) -> None:
    assert normalize(ref, "en") == normalize(hyp, "en")
    assert score([clip(0, ref)], [hyp])["overall"]["errors"] == 0


def test_cer_for_japanese() -> None:
    c = clip(0, "今日は、良い天気です。", lang="ja")
    rep = score([c], ["今日は 良い天気でした"])
    o = rep["overall"]
    assert o["metric"] == "cer" and rep["by_lang"]["ja"]["metric"] == "cer"
    assert o["ref_units"] == len("今日は良い天気です")  # punctuation and spaces dropped
    assert (o["sub"], o["del"], o["ins"]) == (1, 0, 1)  # す->し, +た
    assert o["error_rate"] == pytest.approx(2 / 9)
    assert "CER %" in format_table(rep)


def test_groups_and_empty_reference() -> None:
    clips = [clip(0, "red green", "x"), clip(1, "blue", "y", dur=4.0),
             clip(2, "Uh, um.", "y"),  # fillers only: empty after normalisation
             clip(3, "hola mundo", "y", lang="es")]
    rep = score(clips, ["red green", "black", "noise", "Hola, mundo."])
    o = rep["overall"]
    assert o["n"] == 4 and o["n_scored"] == 3 and o["n_empty_ref"] == 1
    assert o["ref_units"] == 5 and o["error_rate"] == pytest.approx(1 / 5)
    assert rep["by_domain"]["y"]["n"] == 3 and rep["by_domain"]["y"]["n_empty_ref"] == 1
    assert rep["by_domain"]["y"]["hours"] == pytest.approx(8.0 / 3600)
    assert rep["by_domain"]["x"]["error_rate"] == 0.0
    assert set(rep["by_lang"]) == {"en", "es"} and rep["by_lang"]["es"]["error_rate"] == 0.0
    assert rep["utterances"][2]["scored"] is False


def test_score_length_mismatch() -> None:
    with pytest.raises(ValueError):
        score([clip(0, "a")], [])


# --- manifests and splits ----------------------------------------------------------------------

def test_read_real_manifest(dev_manifest: Path) -> None:
    clips = read_manifest(dev_manifest)
    assert len(clips) == 303
    assert len({c.id for c in clips}) == 303
    domains = {c.domain for c in clips}
    assert len(domains) >= 5
    assert any("LibriSpeech" in d for d in domains)
    assert all(c.lang == "en" and c.audio.is_file() and c.duration > 0 for c in clips)

    pick = [clips[5].id, clips[0].id]
    sub = read_manifest(dev_manifest, ids=pick)
    assert [c.id for c in sub] == [clips[0].id, clips[5].id]  # manifest order kept
    rest = read_manifest(dev_manifest, exclude=pick)
    assert len(rest) == 301 and not set(pick) & {c.id for c in rest}
    with pytest.raises(ValueError, match="no_such_clip"):
        read_manifest(dev_manifest, ids=[clips[0].id, "no_such_clip"])


def test_read_multilingual_manifest() -> None:
    path = SHARED / "data" / "speech-multilingual" / "ja" / "manifest.jsonl"
    if not path.is_file():
        pytest.skip("multilingual data not available")
    assert {c.lang for c in read_manifest(path)} == {"ja"}


def test_broken_manifest_errors(tmp_path: Path) -> None:
    (tmp_path / "a.flac").write_bytes(b"")
    good = {"id": "a", "audio": "a.flac", "text": "hi", "domain": "d", "duration_s": 1.0}
    lines = [json.dumps(good), "{not json",
             json.dumps({k: v for k, v in good.items() if k != "text"} | {"id": "b"}),
             json.dumps(good | {"id": "c", "audio": "missing.flac"})]
    m = tmp_path / "manifest.jsonl"
    m.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as ei:
        read_manifest(m)
    msg = str(ei.value)
    assert f"{m}:2: bad JSON" in msg
    assert f"{m}:3: missing field 'text'" in msg
    assert f"{m}:4: field 'audio'" in msg and "missing.flac" in msg
    assert f"{m}:1" not in msg


def test_read_split_formats(tmp_path: Path) -> None:
    txt = tmp_path / "ids.txt"
    txt.write_text("# header\na\n\nb  # trailing comment\n  c\n")
    assert read_split(txt) == ["a", "b", "c"]
    lst = tmp_path / "ids.json"
    lst.write_text(json.dumps(["x", "y"]))
    assert read_split(lst) == ["x", "y"]
    obj = tmp_path / "split.json"
    obj.write_text(json.dumps({"calibration": ["p"], "eval": ["q", "r"]}))
    assert read_split(obj) == ["q", "r"]
    assert read_split(obj, key="calibration") == ["p"]
    with pytest.raises(ValueError, match="nope"):
        read_split(obj, key="nope")


def test_split_clips_properties() -> None:
    clips = ([clip(i, "w", "big") for i in range(20)]
             + [clip(100 + i, "w", "pair") for i in range(2)] + [clip(200, "w", "single")])
    cal, ev = split_clips(clips, calibration_fraction=0.3, seed=0)
    cal_ids, ev_ids = {c.id for c in cal}, {c.id for c in ev}
    assert not cal_ids & ev_ids
    assert cal_ids | ev_ids == {c.id for c in clips}
    for dom in ("big", "pair"):
        assert any(c.domain == dom for c in cal) and any(c.domain == dom for c in ev)
    assert sum(c.domain == "big" for c in cal) == 6
    assert [c.id for c in ev if c.domain == "single"] == ["c200"]
    assert split_clips(clips, 0.3, seed=0) == (cal, ev)
    assert split_clips(list(reversed(clips)), 0.3, seed=0)[0] == list(reversed(cal))
    assert split_clips(clips, 0.3, seed=1) != (cal, ev)
    with pytest.raises(ValueError):
        split_clips(clips, calibration_fraction=1.0)


def test_split_real_manifest(dev_manifest: Path) -> None:
    clips = read_manifest(dev_manifest)
    cal, ev = split_clips(clips, seed=0)
    assert len(cal) + len(ev) == 303 and not {c.id for c in cal} & {c.id for c in ev}
    counts: dict[str, int] = {}
    for c in clips:
        counts[c.domain] = counts.get(c.domain, 0) + 1
    for dom, n in counts.items():
        on_cal = any(c.domain == dom for c in cal)
        assert on_cal == (n >= 2) and any(c.domain == dom for c in ev)


# --- evaluate and reports --------------------------------------------------------------------

def test_evaluate_and_write_report(tmp_path: Path) -> None:
    words = "zero one two three four five six seven eight nine".split()
    clips = [clip(i, f"{words[i]} alpha beta", "odd" if i % 2 else "even", dur=3.0)
             for i in range(10)]
    calls: list[int] = []

    def fake(batch: list[Clip]) -> list[str]:
        calls.append(len(batch))
        return [c.text if int(c.id[1:]) < 5 else "" for c in batch]

    rep = evaluate(fake, clips, batch_size=4, progress=False)
    assert calls == [4, 4, 2]
    o = rep["overall"]
    assert (o["sub"], o["del"], o["ins"], o["ref_units"]) == (0, 15, 0, 30)
    assert o["error_rate"] == pytest.approx(0.5)
    assert rep["audio_s"] == pytest.approx(30.0)
    assert rep["wall_s"] > 0 and rep["rtfx"] > 0
    assert rep["rtfx"] == pytest.approx(rep["audio_s"] / rep["wall_s"])

    out_json, out_md = tmp_path / "r" / "report.json", tmp_path / "r" / "report.md"
    write_report(rep, out_json, out_md, title="Test run")
    assert sorted(p.name for p in out_json.parent.iterdir()) == ["report.json", "report.md"]
    data = json.loads(out_json.read_text())
    assert data["overall"]["error_rate"] == pytest.approx(0.5) and len(data["utterances"]) == 10
    md = out_md.read_text()
    assert md.startswith("# Test run")
    assert "| **overall** | 10 | 0.008 | 30 | 50.00 | 0 | 15 | 0 |" in md
    assert md.index("**overall**") < md.index("| even |") and "RTFx" in md
    assert format_table(rep) in md
    # Overwriting is atomic too and leaves no temp files behind.
    write_report(rep, out_json)
    assert sorted(p.name for p in out_json.parent.iterdir()) == ["report.json", "report.md"]


def test_evaluate_rejects_wrong_batch_output() -> None:
    with pytest.raises(ValueError, match="returned"):
        evaluate(lambda b: ["x"], [clip(0, "a"), clip(1, "b")], batch_size=2, progress=False)


# --- choosing and transcribing clips ---------------------------------------------------------

def test_spread_even_and_by_domain(dev_manifest: Path) -> None:
    assert spread(range(10), 5) == [0, 2, 4, 6, 8] and spread(range(3), 5) == [0, 1, 2]
    assert spread(range(3), None) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least 1"):
        spread(range(3), 0)
    clips = read_manifest(dev_manifest)  # grouped by domain; several domains hold 1-3 clips
    domains = {c.domain for c in clips}
    for n in (len(domains), 40, len(clips) - 1):
        chosen = spread(clips, n, key=lambda c: c.domain)
        assert len({c.id for c in chosen}) == n and {c.domain for c in chosen} == domains
        assert chosen == [c for c in clips if c in chosen]  # manifest order kept


def test_transcribe_clips_forces_the_manifest_language(monkeypatch) -> None:
    calls = []

    def fake(model, paths, options):
        calls.append((options.language, len(paths)))
        return [(i, {"text": f"{options.language}:{Path(p).stem}"}) for i, p in enumerate(paths)]

    import importlib

    # the module: the root package binds the function liteasr.transcribe over the name
    monkeypatch.setattr(importlib.import_module("liteasr.transcribe"), "transcribe_iter", fake)
    clips = [clip(0, "a", lang="de"), clip(1, "b", lang="en"), clip(2, "c", lang="de")]
    assert transcribe_clips(None, clips) == ["de:c0", "en:c1", "de:c2"]  # in order, one call per language
    assert calls == [("de", 2), ("en", 1)]
    assert transcribe_clips(None, clips, detect_language=True) == ["None:c0", "None:c1", "None:c2"]


def test_failed_clips_are_listed_and_left_out_of_the_rates() -> None:
    """A clip that cannot be transcribed is named in the report, counted, and scored nowhere."""
    clips = [clip(i, "alpha beta gamma", "d", dur=2.0) for i in range(4)]

    def fake(batch: list[Clip]) -> list:
        return [OSError(f"{c.id}.wav: not audio") if c.id == "c2" else c.text for c in batch]

    rep = evaluate(fake, clips, batch_size=3, progress=False)
    assert rep["n_failed"] == 1 and rep["failed"] == [{"id": "c2", "error": "c2.wav: not audio"}]
    assert rep["overall"]["error_rate"] == 0 and rep["overall"]["ref_units"] == 9 and rep["audio_s"] == 6.0
    assert "1 clip(s) failed" in format_table(rep) and "c2" in format_table(rep)
    with pytest.raises(ValueError, match="every clip failed"):
        evaluate(lambda b: [OSError("bad")] * len(b), clips, batch_size=4, progress=False)
