"""Accuracy/size sweep: one calibration pass per frame policy, many thresholds, WER on held-out clips.

The statistics do not depend on θ, so every threshold reuses them; each point is applied to a fresh
copy of the dense model, evaluated on clips disjoint from the calibration clips, and timed against
the dense encoder in the same run. Writes sweep.json, sweep.md and sweep.png (Pareto plots).
"""

from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from .. import atomic
from ..bench import encoder_latency
from ..eval import Clip, evaluate, format_table, transcribe_clips
from ..model import Whisper
from . import CompressConfig, compress
from .calibrate import Calibration, calibrate
from .plan import apply_plan, footprint, make_plan
from .recover import recover


def _evaluate(model: Whisper, clips: list[Clip], batch_size: int) -> dict:
    return evaluate(functools.partial(transcribe_clips, model, batch_size=batch_size), clips, batch_size=batch_size,
                    progress=False)


def _point(model: Whisper, label: str, report: dict, dense: dict, latency_ms: float, dense_ms: float) -> dict:
    size = footprint(model)
    return {"label": label, "wer": report["overall"]["error_rate"],
            "by_domain": {d: g["error_rate"] for d, g in report["by_domain"].items()},
            "encoder_params": size["encoder_params"], "encoder_linear_params": size["encoder_linear_params"],
            "encoder_fraction": size["encoder_params"] / dense["encoder_params"],
            "linear_fraction": size["encoder_linear_params"] / dense["encoder_linear_params"],
            "encoder_gflops": size["encoder_flops"] / 1e9, "latency_ms": latency_ms,
            "speedup": dense_ms / latency_ms, "rtfx": report["rtfx"], "low_rank_config": model.low_rank_config}


def sweep(model: Whisper, calibration: list[Clip], evaluation: list[Clip], thresholds: list[str],
          frame_policies: tuple[str, ...] = ("audio",), batch_size: int = 8, out_dir: str | os.PathLike = "sweep",
          progress: bool = True, methods: dict[str, list[CompressConfig]] | None = None) -> list[dict]:
    """Evaluate the dense model, each (frame policy, θ) point of the faithful method, and each point
    of the extra `methods` ({curve label: [CompressConfig, …]}); returns the rows and writes
    sweep.json / sweep.md / sweep.png to `out_dir`."""
    assert not {c.id for c in calibration} & {c.id for c in evaluation}, "calibration and evaluation clips overlap"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, ids = [str(c.audio) for c in calibration], [c.id for c in calibration]
    dense_size = footprint(model)
    dense_ms = encoder_latency(model)
    dense_report = _evaluate(model, evaluation, batch_size)
    rows = [_point(model, "dense", dense_report, dense_size, dense_ms, dense_ms) | {"threshold": None,
                                                                                    "frame_policy": None,
                                                                                    "curve": "dense"}]
    print(format_table(dense_report))

    def add(compressed: Whisper, label: str, curve: str, extra: dict) -> None:
        ms, dense_now = encoder_latency(compressed), encoder_latency(model)  # ratios from one run
        report = _evaluate(compressed, evaluation, batch_size)
        row = _point(compressed, label, report, dense_size, ms, dense_now) | {"curve": curve} | extra
        rows.append(row)
        print(f"{label}: WER {row['wer']:.2%}, encoder {row['encoder_fraction']:.1%}, "
              f"linear {row['linear_fraction']:.1%}, {row['speedup']:.2f}x", flush=True)
        _write(rows, out, calibration, evaluation)

    calibs: dict[str, Calibration] = {}
    for policy in frame_policies:  # the faithful method: statistics once per frame policy, every θ reuses them
        calib = calibs[policy] = calibrate(model, paths, policy, batch_size, progress, ids)
        for theta in thresholds:
            compressed = copy.deepcopy(model)
            apply_plan(compressed, calib, make_plan(compressed, calib, theta))
            add(compressed, f"{policy} θ={theta}", f"LiteASR θ, frames={policy}",
                {"threshold": theta, "frame_policy": policy, "calibration_s": calib.seconds})
    done: dict[CompressConfig, tuple[Whisper, object]] = {}  # config without recovery -> (compressed model, plan)
    for curve, configs in (methods or {}).items():
        for config in configs:
            key = replace(config, recover_steps=0, progress=progress)
            if key in done:  # e.g. recovery on top of a point already compressed: same (deterministic) result
                compressed, plan = copy.deepcopy(done[key][0]), done[key][1]
            else:
                compressed = copy.deepcopy(model)
                plan = compress(compressed, paths, key, ids=ids, calibration=calibs.get(key.frame_policy))
                done[key] = (copy.deepcopy(compressed), plan)
            recovery = None
            if config.recover_steps:  # distil toward the dense model on the calibration clips only
                recovery = recover(compressed, model, paths, steps=config.recover_steps,
                                   refs=[c.text for c in calibration], progress=progress)
            label = f"{curve} " + ",".join(f"{k}={v}" for k, v in _changed(config).items())
            add(compressed, label, curve, {"threshold": config.threshold, "frame_policy": plan.frame_policy,
                                           "method": _changed(config), "allocation": plan.allocation,
                                           "recovery": recovery})
    return rows


def _changed(config: CompressConfig) -> dict:
    """The fields of `config` that differ from the defaults (budget flattened), e.g. {'budget_size': 0.7}."""
    default = asdict(CompressConfig())
    out = {k: v for k, v in asdict(config).items() if v != default[k] and k not in ("progress", "frame_policy")}
    if "budget" in out:
        budget = out.pop("budget")
        out = {f"budget_{budget['kind']}": budget["value"], **out}
    return out


def _write(rows: list[dict], out: Path, calibration: list[Clip], evaluation: list[Clip]) -> None:
    data = {"rows": rows, "calibration": [c.id for c in calibration], "evaluation": [c.id for c in evaluation]}
    atomic.write_text(out / "sweep.json", json.dumps(data, indent=1))
    atomic.write_text(out / "sweep.md", report_md(rows))
    with atomic.file(out / "sweep.png") as tmp:
        plot(rows, tmp)


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
    fig.savefig(path, dpi=120, format="png")  # explicit: the path may be a temporary name
    plt.close(fig)
