"""GPU comparison harness: encoder and end-to-end tables for random weights of the published large-v3 /
large-v3-turbo shapes (no checkpoint needed), dense and compressed (rank profiles), against transformers'
WhisperEncoder / generate on the same inputs, with an fp32 error check of every fast path.

    python3 benchmarks/gpu_bench.py --model large-v3-turbo --compare large-v3 --profile skewed-c uniform-c \
        --batch-size 1 8 32 --sdpa cudnn --profiles ../shared/bench/large-v3-rank-profiles.json

(On the GPU machine ../shared is not there: copy the profiles file into the checkout and pass --profiles.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from liteasr.bench import encoder_flops
from liteasr.model import Whisper

# ---------------------------------------------------------------------------------------------------
# CUDA: encoder and end-to-end tables (liteasr bench --device cuda)

# Shapes of the published models, for timing with random weights (no checkpoint needed).
SHAPES = {
    "large-v3": dict(num_mel_bins=128, vocab_size=51866, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                     encoder_ffn_dim=5120, decoder_layers=32, decoder_attention_heads=20, decoder_ffn_dim=5120),
    "large-v3-turbo": dict(num_mel_bins=128, vocab_size=51866, d_model=1280, encoder_layers=32,
                           encoder_attention_heads=20, encoder_ffn_dim=5120, decoder_layers=4,
                           decoder_attention_heads=20, decoder_ffn_dim=5120),
}
# large-v3's special tokens (its vocabulary of 51866): the prompt <|startoftranscript|><|en|><|transcribe|>
# <|notimestamps|>, <|endoftext|>, and the blank that may not start a transcript
LARGE_V3_PROMPT = (50258, 50259, 50360, 50364)
LARGE_V3_EOT, LARGE_V3_BLANK = 50257, 220
PROFILE_PATHS = ("large-v3-rank-profiles.json", "../shared/bench/large-v3-rank-profiles.json")


def load_profiles(path: str | None = None) -> dict[str, list[dict[str, int]]]:
    """Rank profiles {name: [per encoder layer {linear name: rank}]} from the profiles JSON (default: the first of PROFILE_PATHS)."""
    import json
    import os

    for p in [path] if path else PROFILE_PATHS:
        if p and os.path.exists(p):
            with open(p) as f:
                return json.load(f)["profiles"]
    raise FileNotFoundError(f"no rank profiles file (looked for {path or ', '.join(PROFILE_PATHS)}); pass --profiles")


def random_model(name: str, profile: list[dict[str, int]] | dict[str, int] | None, dtype: torch.dtype, device: str = "cuda",
                 seed: int = 0) -> Whisper:
    """A Whisper of `name`'s shapes (SHAPES) with random weights; `profile` factors every encoder layer at its ranks.

    Weights ~ N(0, 1/fan_in) (unit-scale activations), factors so that their product has that scale too,
    LayerNorm weights 1, biases N(0, 0.02). Same seed, same dense weights for every profile."""
    from liteasr.model import Dims

    dims = Dims(**SHAPES[name])
    if isinstance(profile, dict):  # one rank dict for every layer
        profile = [profile] * dims.encoder_layers
    low_rank = [dict(p) for p in profile] if profile else None  # the profiles file: one dict per layer
    torch.manual_seed(seed)
    with torch.device(device):
        model = Whisper(dims, low_rank)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "weight1" in pname:
                p.normal_(0, p.shape[0] ** -0.5)
            elif p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
            elif "norm" in pname and pname.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    return model.to(dtype).eval()


def cuda_time(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of fn() between CUDA events (device time, after warm-up)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def wall_time(fn, reps: int = 3, warmup: int = 1) -> float:
    """Median milliseconds of fn() by the host clock, synchronised (for loops that sync on their own)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def matmul_ceiling(dtype: torch.dtype = torch.float16, n: int = 8192) -> float:
    """TFLOP/s of an n³ matmul on random data (the ceiling the encoder rates are compared to)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device="cuda", dtype=dtype)
    ms = cuda_time(lambda: torch.mm(a, b, out=out), reps=20)
    return 2 * n ** 3 / ms / 1e9


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def hf_encoder(model: Whisper):
    """transformers' WhisperEncoder (SDPA attention) holding the same weights as `model`'s dense encoder."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    d = model.dims
    cfg = WhisperConfig(num_mel_bins=d.num_mel_bins, d_model=d.d_model, encoder_layers=d.encoder_layers,
                        encoder_attention_heads=d.encoder_attention_heads, encoder_ffn_dim=d.encoder_ffn_dim,
                        attn_implementation="sdpa")
    cfg._attn_implementation = "sdpa"
    p = next(model.parameters())
    with torch.device(p.device):
        enc = WhisperEncoder(cfg).to(p.dtype).eval()
    enc.load_state_dict(model.encoder.state_dict(), strict=False)
    return enc


def hf_whisper(model: Whisper):
    """transformers' WhisperForConditionalGeneration (SDPA) with `model`'s (dense) weights."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    d = model.dims
    cfg = WhisperConfig(vocab_size=d.vocab_size, num_mel_bins=d.num_mel_bins, d_model=d.d_model,
                        encoder_layers=d.encoder_layers, encoder_attention_heads=d.encoder_attention_heads,
                        encoder_ffn_dim=d.encoder_ffn_dim, decoder_layers=d.decoder_layers,
                        decoder_attention_heads=d.decoder_attention_heads, decoder_ffn_dim=d.decoder_ffn_dim,
                        max_source_positions=d.max_source_positions, max_target_positions=d.max_target_positions,
                        decoder_start_token_id=LARGE_V3_PROMPT[0], eos_token_id=LARGE_V3_EOT,
                        pad_token_id=LARGE_V3_EOT, bos_token_id=LARGE_V3_EOT, attn_implementation="sdpa")
    p = next(model.parameters())
    with torch.device(p.device):
        hf = WhisperForConditionalGeneration(cfg).to(p.dtype).eval()
    missing = hf.model.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert not [k for k in missing if "embed_positions" not in k], missing  # HF's sinusoidal encoder positions: ours
    return hf


def _fp32_reference_encoder(model: Whisper) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model.encoder).float()


def _tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9  # TFLOP/s


@torch.inference_mode()
def cuda_encoder_table(profiles: dict[str, dict[str, int] | None], batch_sizes: list[int], dtype: torch.dtype,
                       compile: bool | str, sdpa: str, ceiling: float, shape: str = "large-v3",
                       log=print) -> list[dict]:
    """Encoder ms per batch: transformers' dense WhisperEncoder (CUDA graph), liteasr dense and each profile through
    liteasr.runtime (fast_encoder [+ torch.compile] + EncoderRunner graphs). Error check at batch 1 (the first
    batch size): every path against the same model in float32 (TF32 off), passing when its error is at most
    twice the error of model.py's forward in `dtype` (flash-attention's rule) plus 1e-4."""
    from liteasr.cuda.runtime import EncoderRunner, _sdpa_backends, fast_encoder

    backends = _sdpa_backends(None if sdpa == "auto" else sdpa)
    rows = []
    for name, profile in profiles.items():
        model = random_model(shape, profile, dtype)
        flops = encoder_flops(model)
        runner = EncoderRunner(fast_encoder(model.encoder, compile=compile), backends)
        hf = hf_encoder(model) if profile is None else None
        for b in batch_sizes:
            mel = torch.randn(b, model.dims.num_mel_bins, 3000, device="cuda", dtype=dtype)
            t0 = time.perf_counter()
            out = runner(mel)  # capture (and compilation) happen here
            build_s = time.perf_counter() - t0
            check = ""
            if b == batch_sizes[0]:
                torch.backends.cuda.matmul.allow_tf32 = False  # a float32 reference, not TF32
                torch.backends.cudnn.allow_tf32 = False
                exact = _fp32_reference_encoder(model)(mel.float())
                ref_err = rel_err(model.encoder(mel), exact)
                err = rel_err(out, exact)
                check = f"err {err:.1e} vs ref {ref_err:.1e}: {'ok' if err <= 2 * ref_err + 1e-4 else 'FAIL'}"
                if hf is not None:
                    hf_err = rel_err(hf(mel).last_hidden_state, exact)
                    rows.append(dict(encoder="transformers dense", batch=b, check=f"err {hf_err:.1e} vs ref "
                                     f"{ref_err:.1e}: {'ok' if hf_err <= 2 * ref_err + 1e-4 else 'FAIL'}"))
                del exact
                torch.cuda.empty_cache()
            if hf is not None:
                hf_runner = EncoderRunner(lambda x: hf(x).last_hidden_state)
                ms = cuda_time(lambda: hf_runner(mel))
                row = next((r for r in rows if r["encoder"] == "transformers dense" and r["batch"] == b), None)
                if row is None:
                    row = dict(encoder="transformers dense", batch=b, check="")
                    rows.append(row)
                row.update(ms=ms, tflops=_tflops(flops * b, ms), flops=flops)
                log(f"transformers dense  b={b:<3d} {ms:8.2f} ms  {row['tflops']:5.0f} TFLOP/s", flush=True)
                del hf_runner
            ms = cuda_time(lambda: runner(mel))
            label = "liteasr dense" if profile is None else f"liteasr {name}"
            rows.append(dict(encoder=label, batch=b, ms=ms, tflops=_tflops(flops * b, ms), flops=flops, check=check,
                             build_s=build_s))
            log(f"{label:19s} b={b:<3d} {ms:8.2f} ms  {_tflops(flops * b, ms):5.0f} TFLOP/s  (capture {build_s:.0f} s) "
                f"{check}", flush=True)
            runner.graphs.clear()
            del mel, out
            torch.cuda.empty_cache()
        del model, runner, hf
        torch.cuda.empty_cache()
    for r in rows:
        r["ceiling_pct"] = 100 * r["tflops"] / ceiling if "tflops" in r else None
    return rows


def bench_rules(suppress_eot: bool = True):
    """Token rules for random-weight end-to-end runs (large-v3 vocabulary): <|endoftext|> suppressed at every step
    (transformers' min_new_tokens does the same), so every window decodes exactly the requested tokens."""
    from liteasr.decoding import TokenRules

    return TokenRules(suppress=(LARGE_V3_EOT,) if suppress_eot else (), begin_suppress=(LARGE_V3_BLANK, LARGE_V3_EOT),
                      eot=LARGE_V3_EOT, no_timestamps=LARGE_V3_PROMPT[-1], timestamp_begin=None)


@torch.inference_mode()
def liteasr_generate(rt, model: Whisper, mel: torch.Tensor, n_tokens: int) -> list[list[int]]:
    """Encoder + prompt + exactly n_tokens greedy tokens through a CudaRuntime (no tokenizer needed)."""
    features = rt.encode(mel)
    cache = rt.decoder.cache(features)
    prompt = torch.tensor([LARGE_V3_PROMPT] * mel.shape[0], device=mel.device)
    logits = model.decoder(prompt, cache)[:, -1]  # (B, V)
    tokens, _ = rt.decoder.greedy(cache, logits, prompt.shape[1], bench_rules(), n_tokens)
    return tokens


@torch.inference_mode()
def reference_generate(model: Whisper, mel: torch.Tensor, n_tokens: int) -> tuple[list[list[int]], torch.Tensor]:
    """The same through model.py's forward, eager, one decoder call per token (int offsets, filled prefix only).
    Returns the tokens and the first step's logits (B, V)."""
    features = model.encoder(mel)
    cache = model.decoder.new_cache(features)
    prompt = torch.tensor([LARGE_V3_PROMPT] * mel.shape[0], device=mel.device)
    logits = model.decoder(prompt, cache)[:, -1]
    first_logits = logits.clone()
    out = []
    for step in range(n_tokens):
        logits[:, LARGE_V3_EOT] = -float("inf")
        if step == 0:
            logits[:, LARGE_V3_BLANK] = -float("inf")
        nxt = logits.argmax(-1)
        out.append(nxt)
        if step + 1 < n_tokens:
            logits = model.decoder(nxt[:, None], cache, prompt.shape[1] + step)[:, -1]
    return torch.stack(out, 1).tolist(), first_logits


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each row's tokens before the first difference (1.0: identical sequences)."""
    fr = []
    for x, y in zip(a, b):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        fr.append(n / max(len(x), 1))
    return sum(fr) / len(fr)


@torch.inference_mode()
def cuda_e2e_table(shapes: list[str], profiles: dict[str, dict[str, int] | None], batch_sizes: list[int],
                   dtype: torch.dtype, compile: bool | str, sdpa: str, n_tokens: int = 64,
                   transformers_baseline: bool = True, log=print) -> list[dict]:
    """End to end per batch of 30-s windows (mel in, n_tokens greedy tokens out), host clock, median: transformers'
    generate (GenerationMixin.generate, greedy, min_new_tokens = max_new_tokens = n_tokens, default cache) on the
    dense weights, and liteasr's CudaRuntime for each profile. Check at the first batch size: liteasr's tokens
    against reference_generate on the same model (agreement before the first difference; random weights give
    near-ties that rounding can flip) and the first step's logits error."""
    from liteasr.cuda import CudaRuntime, RuntimeOptions

    rows = []
    for shape in shapes:
        for name, profile in profiles.items():
            model = random_model(shape, profile, dtype)
            rt = CudaRuntime(model, RuntimeOptions(compile=compile, sdpa=None if sdpa == "auto" else sdpa))
            for b in batch_sizes:
                mel = torch.randn(b, model.dims.num_mel_bins, 3000, device="cuda", dtype=dtype)
                t0 = time.perf_counter()
                got = liteasr_generate(rt, model, mel, n_tokens)
                build_s = time.perf_counter() - t0
                assert all(len(t) == n_tokens for t in got)
                check = ""
                if b == batch_sizes[0]:
                    ref, _ = reference_generate(model, mel, n_tokens)
                    check = f"tokens agree {100 * _agreement(got, ref):.0f} % before first difference"
                ms = wall_time(lambda: liteasr_generate(rt, model, mel, n_tokens), reps=5)
                label = f"liteasr {'dense' if profile is None else name}"
                rows.append(dict(model=shape, system=label, batch=b, ms=ms, rtfx=30 * b / (ms / 1000), check=check,
                                 build_s=build_s))
                log(f"{shape:15s} {label:19s} b={b:<3d} {ms:9.1f} ms  RTFx {30 * b / (ms / 1000):7.0f}  {check}",
                    flush=True)
                if transformers_baseline and profile is None:
                    hf = hf_whisper(model)
                    ms = _hf_generate_ms(hf, mel, n_tokens)
                    rows.append(dict(model=shape, system="transformers generate", batch=b, ms=ms,
                                     rtfx=30 * b / (ms / 1000), check=""))
                    log(f"{shape:15s} {'transformers generate':19s} b={b:<3d} {ms:9.1f} ms  RTFx "
                        f"{30 * b / (ms / 1000):7.0f}", flush=True)
                    del hf
                del mel
                torch.cuda.empty_cache()
            rt.decoder.graphs.clear()
            rt.decoder.caches.clear()
            del model, rt
            torch.cuda.empty_cache()
    return rows


def _hf_generate_ms(hf, mel: torch.Tensor, n_tokens: int) -> float:
    from transformers.generation.utils import GenerationMixin

    prompt = torch.tensor([LARGE_V3_PROMPT] * mel.shape[0], device=mel.device)

    def run():
        out = GenerationMixin.generate(hf, input_features=mel, decoder_input_ids=prompt, max_new_tokens=n_tokens,
                                       min_new_tokens=n_tokens, do_sample=False, num_beams=1)
        assert out.shape[1] == prompt.shape[1] + n_tokens, out.shape
    return wall_time(run, reps=3)


def cuda_report(models: list[str], profile_names: list[str], batch_sizes: list[int], dtype: torch.dtype,
                compile: bool | str = True, sdpa: str = "auto", profiles_path: str | None = None,
                n_tokens: int = 64, e2e: bool = True, json_path: str | None = None, log=print) -> dict:
    """The whole report: matmul ceiling, encoder table and end-to-end table in one run; prints
    markdown tables and returns (and optionally writes) every row."""
    import json

    for m in models:
        if m not in SHAPES:
            raise ValueError(f"--device cuda benchmarks random weights of known shapes: {m!r} is not one of "
                             f"{', '.join(SHAPES)}")
    all_profiles = load_profiles(profiles_path) if profile_names else {}
    missing = [p for p in profile_names if p not in all_profiles]
    if missing:
        raise ValueError(f"unknown rank profile(s) {missing}; the file has {', '.join(all_profiles)}")
    profiles = {"dense": None, **{p: all_profiles[p] for p in profile_names}}
    log(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}, "
        f"compile={compile}, sdpa={sdpa}", flush=True)
    ceiling = matmul_ceiling(dtype)
    log(f"matmul ceiling (8192³, random data): {ceiling:.0f} TFLOP/s", flush=True)
    enc_shapes: dict[tuple, str] = {}  # large-v3 and turbo share the encoder: measured once
    for m in models:
        enc_shapes.setdefault(tuple(v for k, v in SHAPES[m].items() if not k.startswith(("decoder", "vocab"))), m)
    enc_rows = []
    for shape in enc_shapes.values():
        enc_rows += cuda_encoder_table(profiles, batch_sizes, dtype, compile, sdpa, ceiling, shape, log)
    e2e_rows = cuda_e2e_table(models, profiles, batch_sizes, dtype, compile, sdpa, n_tokens, log=log) if e2e else []
    log("\n" + format_encoder_table(enc_rows, ceiling))
    if e2e_rows:
        log("\n" + format_e2e_table(e2e_rows, n_tokens))
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype=str(dtype), compile=compile,
                  sdpa=sdpa, ceiling_tflops=ceiling, encoder=enc_rows, e2e=e2e_rows)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def format_encoder_table(rows: list[dict], ceiling: float) -> str:
    """Markdown: ms per batch, TFLOP/s, % of the ceiling, speed-ups against liteasr dense and transformers."""
    lines = [f"encoder, 30-s windows (matmul ceiling {ceiling:.0f} TFLOP/s)",
             "| encoder | batch | ms | TFLOP/s | % ceiling | vs liteasr dense | vs transformers | check vs fp32 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    ms = {(r["encoder"], r["batch"]): r.get("ms") for r in rows}
    for r in rows:
        if "ms" not in r:
            continue
        dense, hf = ms.get(("liteasr dense", r["batch"])), ms.get(("transformers dense", r["batch"]))
        lines.append(f"| {r['encoder']} | {r['batch']} | {r['ms']:.2f} | {r['tflops']:.0f} | {r['ceiling_pct']:.0f} % "
                     f"| {dense / r['ms']:.2f}x | {hf / r['ms']:.2f}x | {r.get('check', '')} |"
                     if dense and hf else f"| {r['encoder']} | {r['batch']} | {r['ms']:.2f} | {r['tflops']:.0f} | "
                     f"{r['ceiling_pct']:.0f} % | | | {r.get('check', '')} |")
    return "\n".join(lines)


def format_e2e_table(rows: list[dict], n_tokens: int) -> str:
    lines = [f"end to end: encoder + {n_tokens} greedy tokens per 30-s window",
             "| model shapes | system | batch | ms | RTFx | vs transformers | check |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    hf = {(r["model"], r["batch"]): r["ms"] for r in rows if r["system"] == "transformers generate"}
    for r in rows:
        base = hf.get((r["model"], r["batch"]))
        lines.append(f"| {r['model']} | {r['system']} | {r['batch']} | {r['ms']:.1f} | {r['rtfx']:.0f} | "
                     f"{base / r['ms']:.2f}x | {r['check']} |" if base else
                     f"| {r['model']} | {r['system']} | {r['batch']} | {r['ms']:.1f} | {r['rtfx']:.0f} | | "
                     f"{r['check']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="large-v3-turbo", choices=list(SHAPES))
    p.add_argument("--compare", nargs="*", default=[], choices=list(SHAPES))
    p.add_argument("--profile", nargs="*", default=[], help="rank profiles timed beside dense (e.g. skewed-c)")
    p.add_argument("--profiles", default=None, help="rank profiles JSON (default: the first of PROFILE_PATHS)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--compile", default="default", choices=["none", "default", "max-autotune-no-cudagraphs"])
    p.add_argument("--sdpa", default="auto", choices=["auto", "flash", "cudnn", "efficient"])
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per window end to end")
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    compile = {"none": False, "default": True}.get(a.compile, a.compile)
    cuda_report([a.model, *a.compare], a.profile, a.batch_size, getattr(torch, a.dtype), compile=compile,
                sdpa=a.sdpa, profiles_path=a.profiles, n_tokens=a.tokens, e2e=not a.no_e2e, json_path=a.json)


if __name__ == "__main__":
    main()
