"""Model-agnostic evaluation: manifests, splits, normalised corpus WER/CER, reports.

:func:`evaluate` takes any ``transcribe(list[Clip]) -> list[str]`` callable, so the same code
scores the reference model, a quantised one or a fake; :func:`transcribe_clips` is that callable
for a liteasr model (the only function here that touches one, importing it lazily).
"""
from __future__ import annotations

import json
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jiwer
from tqdm import tqdm
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

from . import atomic

# Languages without spaces between words: WER there would measure the tokenizer, not the model.
CER_LANGS = frozenset({"ja", "zh", "yue"})
_REQUIRED = ("id", "audio", "text", "domain", "duration_s")
_EN_NORM = EnglishTextNormalizer()
_BASIC_NORM = BasicTextNormalizer()


@dataclass(frozen=True)
class Clip:
    id: str
    audio: Path
    text: str
    domain: str
    lang: str
    duration: float


def read_manifest(
    path: str | os.PathLike, ids: Iterable[str] | None = None, exclude: Iterable[str] | None = None
) -> list[Clip]:
    """Read and validate a JSON-lines manifest into :class:`Clip` objects (manifest order).

    Every problem (bad JSON, missing/ill-typed field, missing audio file, duplicate id) is
    collected and raised together as one ``ValueError`` naming ``file:line`` and the field, so a
    broken manifest is fixed in one pass. ``ids`` keeps only those ids (unknown ones are an
    error, since a typo would silently shrink the test set); ``exclude`` drops ids and ignores
    unknown ones (an exclusion list may cover several manifests).
    """
    path = Path(path)
    errors: list[str] = []
    clips: list[Clip] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: bad JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            errors.append(f"{where}: row is not a JSON object")
            continue
        missing = [f for f in _REQUIRED if f not in row]
        if missing:
            errors.extend(f"{where}: missing field '{f}'" for f in missing)
            continue
        bad = [f for f in ("id", "audio", "text", "domain") if not isinstance(row[f], str)]
        if row.get("lang") is not None and not isinstance(row["lang"], str):
            bad.append("lang")
        dur = row["duration_s"]
        if isinstance(dur, bool) or not isinstance(dur, (int, float)) or dur < 0:
            bad.append("duration_s")
        if bad:
            errors.extend(f"{where}: field '{f}' has bad value {row[f]!r}" for f in bad)
            continue
        if not row["id"]:
            errors.append(f"{where}: field 'id' is empty")
            continue
        if row["id"] in seen:
            errors.append(f"{where}: field 'id' duplicates line {seen[row['id']]} ({row['id']})")
            continue
        seen[row["id"]] = lineno
        audio = path.parent / row["audio"]
        if not audio.is_file():
            errors.append(f"{where}: field 'audio': file not found: {audio}")
            continue
        clips.append(Clip(row["id"], audio, row["text"], row["domain"],
                          row.get("lang") or "en", float(dur)))
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"invalid manifest {path} ({len(errors)} problems):\n  "
                         + "\n  ".join(errors[:20]) + more)
    if ids is not None:
        wanted = list(dict.fromkeys(ids))
        unknown = [i for i in wanted if i not in seen]
        if unknown:
            raise ValueError(f"{len(unknown)} id(s) not in {path}: {', '.join(unknown[:5])}"
                             + (" ..." if len(unknown) > 5 else ""))
        keep = set(wanted)
        clips = [c for c in clips if c.id in keep]
    if exclude is not None:
        drop = set(exclude)
        clips = [c for c in clips if c.id not in drop]
    return clips


def read_split(path: str | os.PathLike, key: str = "eval") -> list[str]:
    """Read clip ids from a split file.

    ``*.json``: a list of ids, or an object such as ``{"calibration": [...], "eval": [...]}``
    from which ``key`` is taken. Anything else: one id per line, blank lines and ``#`` comments
    ignored.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json":
        lines = (ln.split("#", 1)[0].strip() for ln in text.splitlines())
        return [ln for ln in lines if ln]
    data = json.loads(text)
    if isinstance(data, dict):
        if key not in data:
            raise ValueError(f"{path}: no key {key!r} (has {sorted(data)})")
        data = data[key]
    if not isinstance(data, list) or not all(isinstance(i, str) for i in data):
        raise ValueError(f"{path}: expected a list of id strings" + (f" under {key!r}" if
                         key else ""))
    return list(data)


def split_clips(
    clips: Sequence[Clip], calibration_fraction: float = 0.3, seed: int = 0
) -> tuple[list[Clip], list[Clip]]:
    """Split clips into disjoint ``(calibration, eval)`` lists, stratified by domain.

    Within each domain the clips are sorted by id and shuffled with a RNG seeded by
    ``(seed, domain)``, so the result depends only on the clip set and the seed, not on input
    order or on which other domains are present. A domain with n >= 2 clips gives
    ``round(n * fraction)`` clips, clamped to [1, n-1], to calibration and the rest to eval; a
    singleton domain goes to eval (scoring it matters more than calibrating on one clip).
    Both lists keep the input order.
    """
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    by_domain: dict[str, list[Clip]] = defaultdict(list)
    for c in clips:
        by_domain[c.domain].append(c)
    cal_ids: set[str] = set()
    for domain, group in by_domain.items():
        if len(group) < 2:
            continue
        members = sorted(group, key=lambda c: c.id)
        random.Random(f"{seed}:{domain}").shuffle(members)
        k = min(max(round(len(members) * calibration_fraction), 1), len(members) - 1)
        cal_ids.update(c.id for c in members[:k])
    return [c for c in clips if c.id in cal_ids], [c for c in clips if c.id not in cal_ids]


def spread(items: Sequence, n: int | None, key: Callable[[Any], Any] | None = None) -> list:
    """``n`` items evenly spaced over ``items``, in their order (all of them when ``n`` is None or not smaller).

    With ``key`` (e.g. the clip's domain) the items are strata: each gets one item first, when ``n``
    allows, and the rest in proportion to its size (largest remainders), evenly spaced within it.
    Manifests are grouped by domain, so the first ``n`` clips would all come from the first domain,
    and plain even spacing would still miss the domains of one or two clips.
    """
    items = list(items)
    if n is None or n >= len(items):
        return items
    if n < 1:
        raise ValueError(f"limit must be at least 1, not {n}")
    groups: dict[Any, list[int]] = defaultdict(list)  # without a key: one stratum, plain even spacing
    for i, item in enumerate(items):
        groups[key(item) if key else None].append(i)
    sizes = {g: len(idx) for g, idx in groups.items()}
    base = 1 if n >= len(groups) else 0
    share = {g: (n - base * len(groups)) * (size - base) / (len(items) - base * len(groups)) for g, size in sizes.items()}
    quota = {g: base + int(share[g]) for g in groups}
    for g in sorted(groups, key=lambda g: (int(share[g]) - share[g], -sizes[g]))[: n - sum(quota.values())]:
        quota[g] += 1  # the largest remainders take the items left over
    chosen = [idx[j * len(idx) // quota[g]] for g, idx in groups.items() for j in range(quota[g])]
    return [items[i] for i in sorted(chosen)]


def transcribe_clips(model: Any, clips: Sequence[Clip], batch_size: int = 8,
                     detect_language: bool = False, **options: Any) -> list[str | Exception]:
    """Transcripts of ``clips`` by a liteasr model (or runtime), in order; an Exception in place of the
    transcript of a clip that could not be read or decoded (the others are still transcribed).

    Each clip's manifest language is forced, as ASR benchmarks do (clips are decoded in groups of one
    language), unless ``detect_language``, which lets a multilingual model detect it. ``options`` are
    further TranscribeOptions fields (e.g. decoding options).
    """
    from .transcribe import TranscribeOptions, transcribe_iter

    langs = [None if detect_language else c.lang for c in clips]
    texts: list[str | Exception] = [""] * len(clips)
    for lang in dict.fromkeys(langs):
        idx = [i for i, lg in enumerate(langs) if lg == lang]
        opts = TranscribeOptions(language=lang, batch_size=batch_size, **options)
        for j, r in transcribe_iter(model, [str(clips[i].audio) for i in idx], opts):
            texts[idx[j]] = r if isinstance(r, Exception) else r["text"]
    return texts


def metric_for(lang: str) -> str:
    """``"cer"`` for languages written without word spaces, else ``"wer"``."""
    return "cer" if lang in CER_LANGS else "wer"


def normalize(text: str, lang: str = "en") -> str:
    """Whisper normalisation: English normaliser for ``en``, basic one otherwise.

    For CER languages all whitespace is removed so that the normaliser's punctuation-to-space
    replacement does not count as characters.
    """
    if lang == "en":
        return _EN_NORM(text).strip()
    out = _BASIC_NORM(text)
    return "".join(out.split()) if metric_for(lang) == "cer" else " ".join(out.split())


def _counts(alignment: list[Any]) -> tuple[int, int, int]:
    """(sub, del, ins) of one jiwer alignment."""
    s = d = i = 0
    for ch in alignment:
        if ch.type == "substitute":
            s += ch.ref_end_idx - ch.ref_start_idx
        elif ch.type == "delete":
            d += ch.ref_end_idx - ch.ref_start_idx
        elif ch.type == "insert":
            i += ch.hyp_end_idx - ch.hyp_start_idx
    return s, d, i


def _group(rows: list[dict[str, Any]]) -> dict[str, Any]:
    metrics = {r["metric"] for r in rows}
    scored = [r for r in rows if r["scored"]]
    units = sum(r["ref_units"] for r in scored)
    sub, dele, ins = (sum(r[k] for r in scored) for k in ("sub", "del", "ins"))
    audio_s = sum(r["duration"] for r in rows)
    return {
        # "mixed" only when WER and CER languages are pooled: the rate is then edits per unit.
        "metric": metrics.pop() if len(metrics) == 1 else "mixed",
        "n": len(rows), "n_scored": len(scored), "n_empty_ref": len(rows) - len(scored),
        "audio_s": audio_s, "hours": audio_s / 3600.0, "ref_units": units,
        "sub": sub, "del": dele, "ins": ins, "errors": sub + dele + ins,
        "error_rate": (sub + dele + ins) / units if units else None,
    }


def score(clips: Sequence[Clip], hypotheses: Sequence[str]) -> dict[str, Any]:
    """Corpus error rates (total edits / total reference units), overall, per domain, per lang.

    References and hypotheses are normalised (:func:`normalize`), then scored by jiwer on whole
    lists (words for WER languages, characters for CER ones). Clips with an empty normalised
    reference are counted (``n_empty_ref``) but excluded from the rates, which would otherwise
    be undefined. ``utterances`` holds one row per clip for error analysis.
    """
    if len(clips) != len(hypotheses):
        raise ValueError(f"{len(clips)} clips but {len(hypotheses)} hypotheses")
    rows: list[dict[str, Any]] = []
    for c, hyp in zip(clips, hypotheses):
        ref_n, hyp_n = normalize(c.text, c.lang), normalize(hyp, c.lang)
        rows.append({"id": c.id, "domain": c.domain, "lang": c.lang, "metric": metric_for(c.lang),
                     "duration": c.duration, "ref": c.text, "hyp": hyp, "ref_norm": ref_n,
                     "hyp_norm": hyp_n, "scored": bool(ref_n), "ref_units": 0, "sub": 0,
                     "del": 0, "ins": 0, "errors": 0, "error_rate": None})
    for metric, process in (("wer", jiwer.process_words), ("cer", jiwer.process_characters)):
        todo = [r for r in rows if r["metric"] == metric and r["scored"]]
        if not todo:
            continue
        out = process([r["ref_norm"] for r in todo], [r["hyp_norm"] for r in todo])
        for r, ref_tokens, align in zip(todo, out.references, out.alignments):
            s, d, i = _counts(align)
            n = len(ref_tokens)
            r.update({"ref_units": n, "sub": s, "del": d, "ins": i, "errors": s + d + i,
                      "error_rate": (s + d + i) / n})
        # The per-utterance split must add up to jiwer's own corpus totals.
        assert sum(r["errors"] for r in todo) == out.substitutions + out.deletions + out.insertions
    by_domain: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_lang: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_domain[r["domain"]].append(r)
        by_lang[r["lang"]].append(r)
    return {
        "overall": _group(rows),
        # Largest domains first: the table then reads in order of weight in the overall rate.
        "by_domain": {k: _group(v) for k, v in
                      sorted(by_domain.items(), key=lambda kv: (-len(kv[1]), kv[0]))},
        "by_lang": {k: _group(v) for k, v in sorted(by_lang.items())},
        "utterances": rows,
    }


def evaluate(
    transcribe: Callable[[list[Clip]], list[str]], clips: Sequence[Clip],
    batch_size: int = 8, progress: bool = True,
) -> dict[str, Any]:
    """Transcribe ``clips`` in batches with ``transcribe`` and score them.

    The wall time covers only the ``transcribe`` calls (audio loading included, since the
    callable does it), so ``rtfx`` = audio seconds / wall seconds is the end-to-end speed.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    clips = list(clips)
    hyps: list[str | Exception] = []
    wall = 0.0
    with tqdm(total=len(clips), unit="clip", desc="transcribe", disable=not progress) as bar:
        for start in range(0, len(clips), batch_size):
            batch = clips[start:start + batch_size]
            t0 = time.perf_counter()
            out = list(transcribe(batch))
            wall += time.perf_counter() - t0
            if len(out) != len(batch):
                raise ValueError(f"transcribe returned {len(out)} texts for {len(batch)} clips")
            hyps.extend(out)
            bar.update(len(batch))
    # clips that failed (unreadable audio, a decode error) are listed and left out of every rate
    failed = [{"id": c.id, "error": str(h)} for c, h in zip(clips, hyps) if isinstance(h, Exception)]
    kept = [(c, h) for c, h in zip(clips, hyps) if not isinstance(h, Exception)]
    if not kept:
        raise ValueError(f"every clip failed ({len(failed)}); first: {failed[0]['id']}: {failed[0]['error']}")
    report = score([c for c, _ in kept], [h for _, h in kept])
    audio_s = sum(c.duration for c, _ in kept)
    report.update(wall_s=wall, audio_s=audio_s, rtfx=audio_s / wall if wall > 0 else None,
                  batch_size=batch_size, n_failed=len(failed), failed=failed)
    return report


def _fmt_row(label: str, g: dict[str, Any], mixed: bool) -> str:
    rate = "n/a" if g["error_rate"] is None else f"{100 * g['error_rate']:.2f}"
    # In a table pooling WER and CER languages, tag every row that is not plain WER.
    if mixed and g["metric"] != "wer" and rate != "n/a":
        rate += " (CER)" if g["metric"] == "cer" else " (mixed)"
    label = label.replace("|", "\\|")
    return (f"| {label} | {g['n']} | {g['hours']:.3f} | {g['ref_units']} | {rate} | "
            f"{g['sub']} | {g['del']} | {g['ins']} |")


def format_table(report: dict[str, Any]) -> str:
    """Markdown table: overall row, then one per domain, then per language if several."""
    metric = report["overall"]["metric"]
    mixed = metric == "mixed"
    head = {"wer": ("words", "WER %"), "cer": ("chars", "CER %")}.get(
        metric, ("words/chars", "WER/CER %"))
    lines = [f"| group | clips | hours | {head[0]} | {head[1]} | sub | del | ins |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             _fmt_row("**overall**", report["overall"], mixed)]
    lines += [_fmt_row(d, g, mixed) for d, g in report["by_domain"].items()]
    if len(report.get("by_lang", {})) > 1:
        lines += [_fmt_row(f"lang: {k}", g, mixed) for k, g in report["by_lang"].items()]
    if report.get("n_failed"):
        lines.append(f"\n{report['n_failed']} clip(s) failed and are left out of every rate: "
                     + "; ".join(f"{f['id']} ({f['error']})" for f in report["failed"]))
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_json: str | os.PathLike,
                 out_md: str | os.PathLike | None = None,
                 title: str = "LiteASR evaluation") -> None:
    """Atomically write ``report`` as JSON and, if ``out_md`` is given, as a markdown summary."""
    # allow_nan=False: a NaN/inf would produce JSON other tools cannot parse; fail loudly instead.
    atomic.write_text(out_json, json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    if out_md is None:
        return
    parts = [f"# {title}", "", format_table(report), ""]
    if report.get("wall_s") is not None:
        rtfx = report.get("rtfx")
        parts.append(f"Wall time {report['wall_s']:.2f} s for {report['audio_s']:.1f} s of audio "
                     f"(RTFx {'n/a' if rtfx is None else f'{rtfx:.1f}'}, "
                     f"batch size {report.get('batch_size', '?')}).")
    empty = report["overall"]["n_empty_ref"]
    if empty:
        parts.append(f"{empty} clip(s) with an empty normalised reference are counted but "
                     "excluded from the rates.")
    atomic.write_text(out_md, "\n".join(parts) + "\n")
