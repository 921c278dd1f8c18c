"""GPU round two (issue 18): every encoder lever of liteasr.cuda.RuntimeOptions checked against float32 and timed side
by side with transformers' encoder, the decoder step compiled vs not (large-v3 shapes), and end to end, in one call.

    python3 benchmarks/gpu_round2.py --profiles large-v3-rank-profiles.json --out $OUT

Random weights of the published large-v3 / turbo shapes (benchmarks/gpu_bench.py's random_model), float16, 30-s
windows, CUDA-graph replay, CUDA events, median of 10 after warm-up. Encoder variants (RuntimeOptions fields):

    compile        torch.compile per layer (Inductor fuses LayerNorm / GELU / residual adds): round one's path
    compile+epi    ... and fc1's bias + GELU in the cuBLASLt epilogue (torch._addmm_activation)
    fused          no compile: fused_norm (Triton residual + LayerNorm) + gelu_epilogue
    fused+fp8      ... and the linears in FP8 E4M3 (_scaled_mm, per-channel weight / per-token activation scales)

Check column: ‖out − fp32‖/‖fp32‖ at batch 1 against the same model in float32 (TF32 off), next to model.py's eager
fp16 error; 'ok' when at most 2x that + 1e-4 (flash-attention's rule; FP8 is reported, not held to it).
With --real DIR (a bundle from `prepare` below) the same errors on real weights and real speech.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import torch

from gpu_bench import (LARGE_V3_PROMPT, _hf_generate_ms, bench_rules, cuda_time, hf_encoder, hf_whisper,
                       load_profiles, matmul_ceiling, random_model, rel_err, wall_time)
from liteasr.bench import encoder_flops
from liteasr.cuda.runtime import CudaRuntime, EncoderRunner, RuntimeOptions, _sdpa_backends, fast_encoder

VARIANTS = {
    "compile": dict(compile=True),
    "compile+epi": dict(compile=True, gelu_epilogue=True),
    "fused": dict(fused_norm=True, gelu_epilogue=True),
    "fused+fp8": dict(fused_norm=True, gelu_epilogue=True, fp8="all"),
    "fused+fp8dense": dict(fused_norm=True, gelu_epilogue=True, fp8="dense"),
}


class Log:
    def __init__(self, path: str | None):
        self.f = open(path, "a") if path else None

    def __call__(self, *a):
        line = " ".join(str(x) for x in a)
        print(line, flush=True)
        if self.f:
            self.f.write(line + "\n")
            self.f.flush()


def fp8_ceiling(n: int = 8192) -> float:
    from liteasr.cuda.fp8 import E4M3

    a = torch.randn(n, n, device="cuda").to(E4M3)
    b = torch.randn(n, n, device="cuda").to(E4M3)
    sa, sb = torch.ones(n, 1, device="cuda"), torch.ones(1, n, device="cuda")
    ms = cuda_time(lambda: torch._scaled_mm(a, b.T, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16), reps=20)
    return 2 * n ** 3 / ms / 1e9


@torch.inference_mode()
def encoder_table(profiles: dict, variants: dict[str, list[tuple[str, list[int]]]], batch_sizes: list[int], log,
                  rows: list) -> None:
    """variants: per profile name the (VARIANTS key, batch sizes) to run; transformers' encoder at batch_sizes.
    Appends rows {model, variant, batch, ms, tflops, err, ref_err}."""
    backends = _sdpa_backends("cudnn")
    for name, profile in profiles.items():
        model = random_model("large-v3", profile, torch.float16)
        flops = encoder_flops(model)
        mel1 = torch.randn(1, 128, 3000, device="cuda", dtype=torch.float16)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        import copy

        ref32 = copy.deepcopy(model.encoder).float()
        exact = ref32(mel1.float())
        del ref32
        ref_err = rel_err(model.encoder(mel1), exact)
        log(f"{name}: {flops / 1e12:.2f} TFLOP per window; eager fp16 error vs fp32 {ref_err:.2e}")
        if name == "dense":
            hf = hf_encoder(model)
            err = rel_err(hf(mel1).last_hidden_state, exact)
            for b in batch_sizes:
                mel = torch.randn(b, 128, 3000, device="cuda", dtype=torch.float16)
                r = EncoderRunner(lambda x: hf(x).last_hidden_state)
                ms = cuda_time(lambda: r(mel))
                rows.append(dict(model=name, variant="transformers", batch=b, ms=ms, tflops=flops * b / ms / 1e9,
                                 err=err if b == 1 else None, ref_err=ref_err))
                log(f"  transformers      b={b:<3d} {ms:8.2f} ms {flops * b / ms / 1e9:5.0f} TFLOP/s"
                    + (f"  err {err:.2e}" if b == 1 else ""))
                del r
            del hf
            torch.cuda.empty_cache()
        for v, v_batch_sizes in variants[name]:
            try:
                enc = fast_encoder(model.encoder, **VARIANTS[v])
                runner = EncoderRunner(enc, backends)
            except Exception as e:  # noqa: BLE001 - report and go on with the other variants
                log(f"  {v}: build failed: {type(e).__name__}: {e}")
                continue
            for b in v_batch_sizes:
                try:
                    mel = mel1 if b == 1 else torch.randn(b, 128, 3000, device="cuda", dtype=torch.float16)
                    t0 = time.perf_counter()
                    out = runner(mel)
                    build = time.perf_counter() - t0
                    err = rel_err(out, exact) if b == 1 else None
                    ms = cuda_time(lambda: runner(mel))
                except Exception as e:  # noqa: BLE001
                    log(f"  {v} b={b}: failed: {type(e).__name__}: {str(e)[:300]}")
                    traceback.print_exc()
                    continue
                ok = "" if err is None else ("ok" if err <= 2 * ref_err + 1e-4 else ("fp8" if "fp8" in v else "FAIL"))
                rows.append(dict(model=name, variant=v, batch=b, ms=ms, tflops=flops * b / ms / 1e9, err=err,
                                 ref_err=ref_err, build_s=build))
                log(f"  {v:17s} b={b:<3d} {ms:8.2f} ms {flops * b / ms / 1e9:5.0f} TFLOP/s (capture {build:.0f} s)"
                    + (f"  err {err:.2e} vs {ref_err:.2e} {ok}" if err is not None else ""))
                runner.graphs.clear()
                torch.cuda.empty_cache()
            del runner, enc
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


@torch.inference_mode()
def decoder_step_table(batch_sizes: list[int], modes: list, log, rows: list) -> None:
    """One greedy step of large-v3's 32-layer decoder replayed from its graph: eager-captured vs compiled-then-captured
    (modes: RuntimeOptions.compile_decoder values, False first)."""
    model = random_model("large-v3", None, torch.float16)
    tokens = {}
    for compiled in modes:
        rt = CudaRuntime(model, RuntimeOptions(compile_decoder=compiled, graphs=True))
        for b in batch_sizes:
            feats = torch.randn(b, 1500, 1280, device="cuda", dtype=torch.float16)
            cache = rt.decoder.cache(feats)
            prompt = torch.tensor([LARGE_V3_PROMPT] * b, device="cuda")
            t0 = time.perf_counter()
            logits = model.decoder(prompt, cache)[:, -1]
            toks, _ = rt.decoder.greedy(cache, logits, prompt.shape[1], bench_rules(), 32)
            build = time.perf_counter() - t0
            graph = rt.decoder.graphs[(b, bench_rules())][0]
            st = rt.decoder.states[b]
            st.offset.fill_(100)
            ms = cuda_time(lambda: [graph.replay() for _ in range(20)], reps=10) / 20
            tokens[(compiled, b)] = toks
            agree = ""
            ref = tokens.get((False, b))
            if compiled and ref is not None:
                same = sum(x == y for x, y in zip(toks, ref))
                agree = f"  tokens identical to the uncompiled step in {same}/{b} rows"
            rows.append(dict(model="large-v3", variant=f"step compile={compiled}", batch=b, ms=ms,
                             build_s=build))
            log(f"  decoder step compile={compiled} b={b:<3d} {ms:7.3f} ms (capture {build:.0f} s){agree}")
        del rt
        torch.cuda.empty_cache()


@torch.inference_mode()
def e2e_table(shapes: dict[str, list[int]], systems: dict[str, tuple], n_tokens: int, profiles: dict, skip,
              log, rows: list) -> None:
    """End to end (mel in, n_tokens greedy tokens out), host clock: transformers generate on the dense weights and
    liteasr CudaRuntime per (label: (profile name, RuntimeOptions kwargs))."""
    from gpu_bench import liteasr_generate

    for shape, batch_sizes in shapes.items():
        for label, (pname, opts) in systems.items():
            if (shape, label) in skip:
                continue
            model = random_model(shape, profiles[pname], torch.float16)
            rt = CudaRuntime(model, RuntimeOptions(sdpa="cudnn", **opts))
            for b in batch_sizes:
                try:
                    mel = torch.randn(b, 128, 3000, device="cuda", dtype=torch.float16)
                    liteasr_generate(rt, model, mel, n_tokens)
                    ms = wall_time(lambda: liteasr_generate(rt, model, mel, n_tokens), reps=5)
                except Exception as e:  # noqa: BLE001
                    log(f"  e2e {shape} {label} b={b}: failed: {type(e).__name__}: {str(e)[:300]}")
                    continue
                rows.append(dict(model=shape, system=label, batch=b, ms=ms))
                log(f"  e2e {shape:15s} {label:24s} b={b:<3d} {ms:8.1f} ms")
                if label == "liteasr dense compile":
                    hf = hf_whisper(model)
                    hms = _hf_generate_ms(hf, mel, n_tokens)
                    rows.append(dict(model=shape, system="transformers generate", batch=b, ms=hms))
                    log(f"  e2e {shape:15s} {'transformers generate':24s} b={b:<3d} {hms:8.1f} ms")
                    del hf
                torch.cuda.empty_cache()
            del model, rt
            torch.cuda.empty_cache()


@torch.inference_mode()
def prepare_real(models: list[str], out: str, n_clips: int = 3) -> None:
    """(CPU, here) The real-weight bundle: each model's encoder (fp16 state dict, dims, ranks) and the log-mel of the
    first n_clips speech-dev check clips, in out/bundle.pt (one call carries at most 64 MiB: base's encoder is 41 MB)."""
    import liteasr
    from fp8_wer import SPEECH_DEV, check_clips
    from liteasr.audio import load_audio, log_mel_spectrogram, pad_or_trim

    encoders = {}
    for name in models:
        m = liteasr.load_model(name, "cpu", torch.float32)
        d = m.dims
        encoders[os.path.basename(name.rstrip("/"))] = dict(
            dims={k: getattr(d, k) for k in d.__dataclass_fields__}, low_rank=m.low_rank_config,
            state={k: v.half() for k, v in m.encoder.state_dict().items()})
    clips = check_clips(SPEECH_DEV)[:n_clips]
    mel = torch.stack([log_mel_spectrogram(torch.from_numpy(pad_or_trim(load_audio(c.audio))), d.num_mel_bins)
                       for c in clips])
    os.makedirs(out, exist_ok=True)
    torch.save(dict(mel=mel, clips=[c.id for c in clips], encoders=encoders), os.path.join(out, "bundle.pt"))


@torch.inference_mode()
def real_table(bundle: str, log, rows: list) -> None:
    """Real weights (encoders of base and its compressed copy, fp16 state dicts) on real speech (log-mel of check
    clips): each variant's encoder-output error against the same encoder in float32."""
    import copy

    data = torch.load(os.path.join(bundle, "bundle.pt"), map_location="cuda")
    mel = data["mel"].cuda()  # (N, 80, 3000) float32
    from liteasr.model import AudioEncoder, Dims

    for name, enc_data in data["encoders"].items():
        dims = Dims(**enc_data["dims"])
        enc32 = AudioEncoder(dims, enc_data["low_rank"] or None).cuda().eval()
        enc32.load_state_dict({k: v.float() for k, v in enc_data["state"].items()})
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        exact = enc32(mel)
        enc16 = copy.deepcopy(enc32).half()
        ref_err = rel_err(enc16(mel.half()), exact)
        log(f"  real {name}: eager fp16 error vs fp32 {ref_err:.2e}")
        rows.append(dict(model=name, variant="eager fp16", err=ref_err))
        for v in ("fused", "fused+fp8dense", "fused+fp8"):
            out = EncoderRunner(fast_encoder(enc16, **VARIANTS[v]))(mel.half())
            err = rel_err(out, exact)
            rows.append(dict(model=name, variant=v, err=err))
            log(f"  real {name}: {v:15s} error vs fp32 {err:.2e} ({err / ref_err:.1f}x fp16's)")
        del enc32, enc16
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=None)
    ap.add_argument("--out", default=".")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--sections", nargs="+", default=["encoder", "decoder", "e2e", "real"])
    ap.add_argument("--real", default=None, help="bundle directory with bundle.pt (real-weight encoder check)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), help="encoder variants to run")
    ap.add_argument("--decoder-modes", nargs="+", default=["eager", "default"],
                    help="decoder step: eager (no compile), default, or a torch.compile mode name")
    ap.add_argument("--decoder-batch-size", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prepare", nargs="+", default=None, metavar="MODEL",
                    help="(CPU) write the real-weight bundle of these models to --out and exit")
    a = ap.parse_args()
    if a.prepare:
        prepare_real(a.prepare, a.out)
        return
    os.makedirs(a.out, exist_ok=True)
    log = Log(os.path.join(a.out, "round2.log"))
    result: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    log(f"device {result['device']}, torch {torch.__version__}")
    result["ceiling_fp16"] = matmul_ceiling(torch.float16)
    result["ceiling_fp8"] = fp8_ceiling()
    log(f"matmul ceiling 8192³: fp16 {result['ceiling_fp16']:.0f} TFLOP/s, fp8 e4m3 row-wise {result['ceiling_fp8']:.0f}")
    all_p = load_profiles(a.profiles)
    profiles = {"dense": None, "skewed-c": all_p["skewed-c"]}
    bs = a.batch_size

    def section(name, fn, *args):
        if name not in a.sections:
            return
        rows: list = []
        t0 = time.perf_counter()
        try:
            fn(*args, log, rows)
        except Exception as e:  # noqa: BLE001 - keep what the other sections measured
            log(f"section {name} failed: {type(e).__name__}: {e}")
            traceback.print_exc()
        result[name] = rows
        log(f"section {name}: {time.perf_counter() - t0:.0f} s")
        with open(os.path.join(a.out, "round2.json"), "w") as f:
            json.dump(result, f, indent=1)

    # skewed-c's 32 layers differ in ranks: compiling them takes ~40 s per batch size, so round one's compiled path
    # is re-timed at batch 8 only (its other numbers: docs/gpu-bench-h200.log)
    plan = {"dense": [("compile", bs), ("compile+epi", bs), ("fused", bs), ("fused+fp8", bs), ("fused+fp8dense", bs)],
            "skewed-c": [("fused", bs), ("fused+fp8", bs), ("fused+fp8dense", bs), ("compile", [8])]}
    plan = {k: [(v, b) for v, b in vs if v in a.variants] for k, vs in plan.items()}
    section("encoder", encoder_table, profiles, plan, bs)
    if a.real:
        section("real", real_table, a.real)
    modes = [{"eager": False, "default": True}.get(m, m) for m in a.decoder_modes]
    section("e2e", e2e_table, {"large-v3-turbo": bs, "large-v3": [1]},
            {"liteasr dense compile": ("dense", dict(compile=True)),
             "liteasr dense fused": ("dense", dict(fused_norm=True, gelu_epilogue=True, compile_decoder=True)),
             "liteasr skewed-c fused": ("skewed-c", dict(fused_norm=True, gelu_epilogue=True, compile_decoder=True)),
             "liteasr skewed-c fused+fp8": ("skewed-c", dict(fused_norm=True, gelu_epilogue=True, fp8="all",
                                                             compile_decoder=True))},
            a.tokens, profiles, {("large-v3", "liteasr dense fused")})
    section("decoder", decoder_step_table, a.decoder_batch_size, modes)


if __name__ == "__main__":
    main()
