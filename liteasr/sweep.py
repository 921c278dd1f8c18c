"""Accuracy/size sweep: one calibration pass per frame policy, many thresholds, WER on held-out clips.

The statistics do not depend on θ, so every threshold reuses them; each point is applied to a fresh
copy of the dense model, evaluated on clips disjoint from the calibration clips, and timed against
the dense encoder in the same run. Writes sweep.json, sweep.md and sweep.png (Pareto plots).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from .bench import encoder_flops, encoder_latency
from .calibrate import Calibration, calibrate
from .compress import apply_plan, encoder_size, make_plan
from .eval import Clip, evaluate, format_table
from .model import Whisper
from .transcribe import transcribe


def _eval(model: Whisper, clips: list[Clip], batch_size: int) -> dict:
    def run(batch: list[Clip]) -> list[str]:
        lang = batch[0].lang if all(c.lang == batch[0].lang for c in batch) else None
        return [r["text"] for r in transcribe(model, [str(c.audio) for c in batch], language=lang,
                                              batch_size=batch_size)]
    return evaluate(run, clips, batch_size=batch_size, progress=False)


def _point(model: Whisper, label: str, report: dict, dense: dict, latency_ms: float, dense_ms: float) -> dict:
    size = encoder_size(model)
    return {"label": label, "wer": report["overall"]["error_rate"],
            "by_domain": {d: g["error_rate"] for d, g in report["by_domain"].items()},
            "encoder_params": size["encoder_params"], "encoder_linear_params": size["encoder_linear_params"],
            "encoder_fraction": size["encoder_params"] / dense["encoder_params"],
            "linear_fraction": size["encoder_linear_params"] / dense["encoder_linear_params"],
            "encoder_gflops": encoder_flops(model) / 1e9, "latency_ms": latency_ms,
            "speedup": dense_ms / latency_ms, "rtfx": report["rtfx"], "low_rank_config": model.low_rank_config}


def sweep(model: Whisper, calibration: list[Clip], evaluation: list[Clip], thresholds: list[str],
          frames: tuple[str, ...] = ("audio",), batch_size: int = 8, out_dir: str | os.PathLike = "sweep",
          progress: bool = True, methods: dict[str, list[dict]] | None = None) -> list[dict]:
    """Evaluate the dense model, each (frame policy, θ) point of the faithful method, and each point
    of the extra `methods` ({curve label: [compress() keyword arguments, …]}); returns the rows and
    writes sweep.json / sweep.md / sweep.png to `out_dir`."""
    from .compress import compress

    assert not {c.id for c in calibration} & {c.id for c in evaluation}, "calibration and evaluation clips overlap"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, ids = [str(c.audio) for c in calibration], [c.id for c in calibration]
    dense_size = encoder_size(model)
    dense_ms = encoder_latency(model)
    dense_report = _eval(model, evaluation, batch_size)
    rows = [_point(model, "dense", dense_report, dense_size, dense_ms, dense_ms) | {"threshold": None, "frames": None,
                                                                                    "curve": "dense"}]
    print(format_table(dense_report))

    def add(compressed: Whisper, label: str, curve: str, extra: dict) -> None:
        ms, dense_now = encoder_latency(compressed), encoder_latency(model)  # ratios from one run
        report = _eval(compressed, evaluation, batch_size)
        row = _point(compressed, label, report, dense_size, ms, dense_now) | {"curve": curve} | extra
        rows.append(row)
        print(f"{label}: WER {row['wer']:.2%}, encoder {row['encoder_fraction']:.1%}, "
              f"linear {row['linear_fraction']:.1%}, {row['speedup']:.2f}x", flush=True)
        _write(rows, out, calibration, evaluation)

    calibs: dict[str, Calibration] = {}
    for policy in frames:  # the faithful method: statistics once per frame policy, every θ reuses them
        calib = calibs[policy] = calibrate(model, paths, frames=policy, batch_size=batch_size, progress=progress,
                                           ids=ids)
        for theta in thresholds:
            compressed = copy.deepcopy(model)
            apply_plan(compressed, calib, make_plan(compressed, calib, theta))
            add(compressed, f"{policy} θ={theta}", f"LiteASR θ, frames={policy}",
                {"threshold": theta, "frames": policy, "calibration_s": calib.seconds})
    done: dict[str, tuple[Whisper, object]] = {}  # compress() arguments -> (compressed model, plan)
    for curve, points in (methods or {}).items():
        for kwargs in points:
            steps = kwargs.get("recover_steps", 0)
            args = {k: v for k, v in kwargs.items() if k != "recover_steps"}
            key = json.dumps(args, sort_keys=True)
            if key in done:  # e.g. recovery on top of a point already compressed: same (deterministic) result
                compressed, plan = copy.deepcopy(done[key][0]), done[key][1]
            else:
                compressed = copy.deepcopy(model)
                plan = compress(compressed, paths, batch_size=batch_size, progress=progress, ids=ids,
                                calibration=calibs.get(args.get("frames", "audio")), **args)
                done[key] = (copy.deepcopy(compressed), plan)
            recovery = None
            if steps:  # distil toward the dense model on the calibration clips only (recover.py)
                from .recover import recover

                recovery = recover(compressed, model, paths, steps=steps, refs=[c.text for c in calibration],
                                   progress=progress)
            label = f"{curve} " + ",".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("frames",))
            add(compressed, label, curve, {"threshold": kwargs.get("threshold"), "frames": plan.frames,
                                           "method": kwargs, "allocation": plan.allocation, "recovery": recovery})
    return rows


def _write(rows: list[dict], out: Path, calibration: list[Clip], evaluation: list[Clip]) -> None:
    data = {"rows": rows, "calibration": [c.id for c in calibration], "evaluation": [c.id for c in evaluation]}
    tmp = out / ".sweep.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out / "sweep.json")
    (out / "sweep.md").write_text(report_md(rows))
    plot(rows, out / "sweep.png")


def report_md(rows: list[dict]) -> str:
    """sweep.md: the summary table, WER per domain for every point, and every point's ranks."""
    parts = ["# Sweep (WER on held-out clips)", "", table(rows), ""]
    domains = list(rows[0]["by_domain"])
    short = [d[d.index("(") + 1: -1] if d.endswith(")") and "(" in d else d for d in domains]  # the corpus name
    parts += ["## WER % per domain", "", "| point | " + " | ".join(short) + " |",
              "| --- |" + " ---: |" * len(domains)]
    for r in rows:
        cells = ["–" if r["by_domain"].get(d) is None else f"{100 * r['by_domain'][d]:.2f}" for d in domains]
        parts.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    parts += ["", "## Ranks per encoder layer (q k v out fc1 fc2; – = dense)", ""]
    keys = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    for r in rows[1:]:
        parts += [f"**{r['label']}**: " + "; ".join(
            f"L{i} " + " ".join(str(layer.get(k, "–")) for k in keys) for i, layer in enumerate(r["low_rank_config"])), ""]
    return "\n".join(parts) + "\n"


def table(rows: list[dict]) -> str:
    """Markdown table of the sweep rows."""
    lines = ["| point | WER % | encoder params | of dense | linear params of dense | GFLOP/window | "
             "encoder ms (CPU, b=1) | speed-up |", "| --- |" + " ---: |" * 7]
    for r in rows:
        lines.append(f"| {r['label']} | {100 * r['wer']:.2f} | {r['encoder_params'] / 1e6:.2f}M | "
                     f"{100 * r['encoder_fraction']:.1f} % | {100 * r['linear_fraction']:.1f} % | "
                     f"{r['encoder_gflops']:.1f} | {r['latency_ms']:.0f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """WER vs encoder size and vs measured encoder latency, one curve per method, dense as a star.

    The WER axis stops at 3× the dense WER (at least dense + 10 points): points where decoding
    broke down (repetition loops give WERs of 100–800 %) would otherwise flatten every useful
    point into one line. Those points are drawn on the top edge as open triangles with their WER."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    dense = rows[0]
    top = max(3 * 100 * dense["wer"], 100 * dense["wer"] + 10)
    for ax, key, xlabel in ((axes[0], "linear_fraction", "encoder linear parameters (fraction of dense)"),
                            (axes[1], "latency_ms", "encoder latency per 30-s window, ms (CPU, batch 1)")):
        for curve in dict.fromkeys(r["curve"] for r in rows[1:]):
            pts = sorted((r[key], 100 * r["wer"]) for r in rows[1:] if r["curve"] == curve)
            (line,) = ax.plot([x for x, _ in pts], [min(y, top) for _, y in pts], "o-", label=curve, alpha=0.85)
            for x, y in pts:
                if y > top:  # off the scale: an open triangle on the edge, labelled with its WER
                    ax.plot([x], [top], "^", mfc="white", color=line.get_color(), markersize=8)
                    ax.annotate(f"{y:.0f} %", (x, top), fontsize=7, xytext=(0, -12), textcoords="offset points",
                                ha="center", color=line.get_color())
        ax.plot([dense[key]], [100 * dense["wer"]], "k*", markersize=12, label="dense")
        ax.axhline(100 * dense["wer"], color="k", lw=0.6, ls=":")
        ax.set_ylim(0, top * 1.04)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("corpus WER % (held-out clips)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle(title or "accuracy vs size and speed (held-out clips)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
