"""The demo's closing table: dense vs compressed, side by side — encoder size, WER, encoder latency.

    python scripts/demo_summary.py --dense tiny.en --lite out/demo/tiny.en-lite \
        --dense-eval out/demo/eval-dense.json --lite-eval out/demo/eval-lite.json --bench out/demo/bench.md

Sizes are counted on the loaded models (encoder parameters, factored layers as their two thin
matrices); WERs come from the two `liteasr eval` reports (same clips: checked); latencies from the
table `liteasr bench --model DENSE --compare LITE` printed (one run, the two models timed one after
the other). Writes the table to stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def encoder_params(name: str) -> int:
    import liteasr

    model = liteasr.load_model(name)
    return sum(p.numel() for p in model.encoder.parameters())


def bench_ms(path: Path, names: list[str]) -> dict[str, float]:
    """Milliseconds per window of each model from a saved `liteasr bench` markdown table
    (rows `| model | backend | dtype | ms |`)."""
    ms: dict[str, float] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in names:
            try:
                ms[cells[0]] = float(cells[-1])
            except ValueError:
                continue
    missing = [n for n in names if n not in ms]
    if missing:
        raise SystemExit(f"{path}: no latency row for {', '.join(missing)}")
    return ms


def wer(path: Path) -> tuple[float, list[str], list[str]]:
    """(corpus WER %, clip ids, domains) of a `liteasr eval` report."""
    report = json.loads(path.read_text(encoding="utf-8"))
    ids = [u["id"] for u in report["utterances"]]
    return 100 * report["overall"]["error_rate"], ids, list(report["by_domain"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dense", required=True, help="the dense model (name or directory)")
    ap.add_argument("--lite", required=True, help="the compressed model directory")
    ap.add_argument("--dense-eval", required=True, type=Path, help="`liteasr eval` report of the dense model")
    ap.add_argument("--lite-eval", required=True, type=Path, help="`liteasr eval` report of the compressed model")
    ap.add_argument("--bench", required=True, type=Path, help="saved output of `liteasr bench --compare`")
    args = ap.parse_args()

    (w_dense, ids_dense, domains), (w_lite, ids_lite, _) = wer(args.dense_eval), wer(args.lite_eval)
    if sorted(ids_dense) != sorted(ids_lite):
        raise SystemExit(f"{args.dense_eval} and {args.lite_eval} score different clips")
    p_dense, p_lite = encoder_params(args.dense), encoder_params(args.lite)
    ms = bench_ms(args.bench, [args.dense, args.lite])
    print(f"\n{args.dense}: dense vs compressed, WER on {len(ids_dense)} held-out clips "
          f"from {len(domains)} domains, encoder latency per 30-s window on this CPU")
    print("| model | encoder params | of dense | WER % | encoder ms | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, name, p, w in (("dense", args.dense, p_dense, w_dense), ("compressed", args.lite, p_lite, w_lite)):
        print(f"| {label} | {p / 1e6:.2f}M | {100 * p / p_dense:.1f} % | {w:.2f} | {ms[name]:.0f} | "
              f"{ms[args.dense] / ms[name]:.2f}x |")


if __name__ == "__main__":
    main()
