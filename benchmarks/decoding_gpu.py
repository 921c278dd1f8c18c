"""GPU cost of beam search against greedy in the CUDA graph runtime, large-v3-turbo shapes, random weights.

    python3 benchmarks/decoding_gpu.py --batch-sizes 1 8 32 --tokens 100 --output docs/results/decoding-gpu-h200.json

Per batch size B: the decoder alone (the encoder is the same for both) generating exactly --tokens tokens per
window after the large-v3 prompt, <|endoftext|> suppressed so that no row stops early:
- greedy: B rows, one graph replay per token;
- beam K (--beam-size, default 5): B·K rows; each replayed step also ranks the K·(K+1) candidates of every
  window, collects finished ones and reorders the static self-attention cache by beam (index_select + copy of
  the whole 448-slot buffers) — all inside the graph, no host round trip per step.
Times are the min over --repeats runs of the whole loop (prompt logits given), synchronised; also reported: the
ms per token and the ratio beam / greedy. fp16 weights by default, as served.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from liteasr.cuda import CudaRuntime, RuntimeOptions
from liteasr.decoding import Search

sys_path = Path(__file__).resolve().parent
import sys  # noqa: E402

sys.path.insert(0, str(sys_path))
from gpu_bench import LARGE_V3_PROMPT, bench_rules, random_model  # noqa: E402


@torch.inference_mode()
def time_search(rt, model, batch: int, search: Search, n_tokens: int, repeats: int) -> float:
    rows = batch * search.group
    d = model.dims.d_model
    device = next(model.parameters()).device
    features = torch.randn(rows, model.dims.max_source_positions, d, device=device, dtype=next(model.parameters()).dtype)
    cache = rt.decoder.cache(features)
    prompt = torch.tensor([LARGE_V3_PROMPT] * rows, device=device)
    logits = model.decoder(prompt, cache)[:, -1]
    run = rt.decoder.beam_search if search.beam else rt.decoder.greedy
    best = float("inf")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(repeats + 1):  # the first call captures the graph
        sync()
        t = time.perf_counter()
        run(cache, logits, prompt.shape[1], bench_rules(), n_tokens, search)
        sync()
        if i:
            best = min(best, time.perf_counter() - t)
    return best * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="large-v3-turbo")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--beam-size", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    model = random_model(args.model, None, dtype)
    rt = CudaRuntime(model, RuntimeOptions())
    rows = []
    for b in args.batch_sizes:
        greedy = time_search(rt, model, b, Search(), args.tokens, args.repeats)
        beam = time_search(rt, model, b, Search(group=args.beam_size, beam=True), args.tokens, args.repeats)
        row = {"batch": b, "greedy_ms": round(greedy, 2), "beam_ms": round(beam, 2),
               "greedy_ms_per_token": round(greedy / args.tokens, 3), "beam_ms_per_token": round(beam / args.tokens, 3),
               "beam_over_greedy": round(beam / greedy, 2)}
        rows.append(row)
        print(row, flush=True)
    report = {"model": args.model, "dtype": args.dtype, "tokens": args.tokens, "beam_size": args.beam_size,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
