"""The plan: PCA of each linear's outputs -> one rank per linear (the rank rule) -> factor and swap.

`make_plan` eigen-decomposes each output covariance (from calibrate.py's moments) and picks the
smallest multiple of 16 explaining more than θ of the variance, keeping a layer dense when
factoring saves no FLOPs. The plan (ranks + explained-variance curves + sizes) is small, saveable
and editable. `apply_plan` factors y ≈ V_k (V_kᵀ W) x + μ + V_k V_kᵀ (b − μ) through
`LowRankLinear.from_pca` and swaps the factors in.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .. import atomic
from ..model import LowRankLinear, Whisper, dense_weight, encoder_linears, set_module
from .calibrate import Calibration

PRESETS = {"a": "0.999", "b": "0.99:0.999", "c": "0.99:0.995"}
ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def parse_threshold(threshold: str | float) -> tuple[float, float]:
    """'0.99:0.999' -> (attention θ, MLP θ); a single number or a preset letter (a, b, c) also works."""
    if isinstance(threshold, (tuple, list)):  # (θ_attention, θ_mlp), e.g. a saved plan's threshold
        threshold = ":".join(str(t) for t in threshold)
    text = PRESETS.get(str(threshold), str(threshold))
    parts = text.split(":")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"threshold {threshold!r} does not parse: use θ, θ_attn:θ_mlp or a preset a|b|c") from None
    if len(values) not in (1, 2):
        raise ValueError(f"threshold {threshold!r} has {len(values)} parts; use θ or θ_attn:θ_mlp")
    if not all(0.0 < v <= 1.0 for v in values):
        raise ValueError(f"threshold {threshold!r} must lie in (0, 1]")
    return (values[0], values[-1])


# ---------------------------------------------------------------------------------------------------
# 2. the plan


@dataclass
class LayerReport:
    d_in: int
    d_out: int
    rank: int | None  # None: dense
    explained: float  # variance explained at `rank` (1.0 when dense)
    curve: list[float]  # cumulative explained variance at ranks 16, 32, …, d_out


@dataclass
class Plan:
    """The result of the search: per-linear ranks plus what they were chosen from. Small and JSON-able."""

    threshold: tuple[float, float]
    frame_policy: str  # calibration statistics over "audio" frames or "all" 1500 (calibrate.FRAME_POLICIES)
    layers: dict[str, LayerReport]
    calibration: list[str] = field(default_factory=list)  # calibration clip ids (keep them out of evaluation)
    calibration_s: float = 0.0
    sequential: bool = False  # calibrated layer by layer on the compressed prefix
    allocation: dict = field(default_factory=dict)  # budgeted allocation report (sensitivities, budget)
    recovery: dict | None = None  # recovery (distillation) report, when it ran

    @property
    def ranks(self) -> dict[str, int]:
        """{linear name: rank} for the factored layers only."""
        return {n: r.rank for n, r in self.layers.items() if r.rank is not None}

    def low_rank_config(self, n_layers: int) -> list[dict[str, int]]:
        config: list[dict[str, int]] = [{} for _ in range(n_layers)]
        for name, rank in self.ranks.items():
            config[int(name.split(".")[2])][name.rsplit(".", 1)[1]] = rank
        return config

    def sizes(self) -> dict[str, int]:
        """Encoder linear parameters and FLOPs per 30-s window (linear layers only), before and after."""
        before = sum(r.d_in * r.d_out for r in self.layers.values())
        after = sum(r.d_in * r.d_out if r.rank is None else r.rank * (r.d_in + r.d_out) for r in self.layers.values())
        return {"linear_params_before": before, "linear_params_after": after,
                "linear_flops_before": 2 * 1500 * before, "linear_flops_after": 2 * 1500 * after}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        if "frames" in data:  # plans written before the field was named for what it holds
            data["frame_policy"] = data.pop("frames")
        layers = {n: LayerReport(**r) for n, r in data.pop("layers").items()}
        return cls(layers=layers, **{k: (tuple(v) if k == "threshold" else v) for k, v in data.items()})


def choose_rank(eigenvalues: Tensor, theta: float, d_in: int, d_out: int) -> tuple[int | None, float, list[float]]:
    """Smallest multiple of 16 explaining more than θ of the variance; None (dense) if that saves no FLOPs.

    eigenvalues (d_out,) in descending order -> (rank or None, explained at that rank, curve)."""
    lam = eigenvalues.clamp(min=0).double()
    total = float(lam.sum())
    cum = (lam.cumsum(0) / total) if total > 0 else torch.ones_like(lam)
    ks = list(range(16, d_out + 1, 16))
    curve = [round(float(cum[k - 1]), 6) for k in ks]
    if theta >= 1.0:
        return None, 1.0, curve
    k = next((k for k in ks if float(cum[k - 1]) > theta), d_out)
    if k * (d_in + d_out) >= d_in * d_out:
        return None, 1.0, curve
    return k, float(cum[k - 1]), curve


def make_plan(model: Whisper, calib: Calibration, threshold: str | float = "0.99:0.999",
              ranks: dict[str, int | None] | None = None) -> Plan:
    """Ranks for every encoder linear at θ (attention:MLP), or the given `ranks` (e.g. from a saved plan)."""
    theta = parse_threshold(threshold)
    layers = {}
    for name, layer in encoder_linears(model).items():
        if not calib.covers(name):
            continue
        lam = torch.linalg.eigvalsh(calib.output_moments(name, layer)[1]).flip(0)  # descending
        d_out, d_in = dense_weight(layer)[0].shape
        t = theta[0] if name.rsplit(".", 1)[1] in ATTENTION else theta[1]
        rank, explained, curve = choose_rank(lam, t, d_in, d_out)
        if ranks is not None:
            rank = ranks.get(name)
            explained = 1.0 if rank is None else curve[min(rank // 16, len(curve)) - 1]
        if isinstance(layer, LowRankLinear) and (rank is None or rank >= layer.rank):
            rank, explained = layer.rank, 1.0  # already factored: never grow or densify it
        layers[name] = LayerReport(d_in, d_out, rank, round(explained, 6), curve)
    return Plan(theta, calib.frame_policy, layers, list(calib.clip_ids), round(calib.seconds, 2))


# ---------------------------------------------------------------------------------------------------
# 3. factor and swap


@torch.no_grad()  # not inference_mode: the new parameters must stay usable for training (recovery)
def apply_plan(model: Whisper, calib: Calibration, plan: Plan) -> Whisper:
    """Swap every planned linear for its LowRankLinear factors, in place; returns the model."""
    linears = encoder_linears(model)
    for name, rank in plan.ranks.items():
        layer = linears[name]
        if isinstance(layer, LowRankLinear) and layer.rank == rank:
            continue
        mean, cov = calib.output_moments(name, layer)
        set_module(model, name, LowRankLinear.from_pca(layer, mean, cov, rank))
    return model


def footprint(model: Whisper) -> dict[str, int]:
    """Encoder parameters (all tensors), encoder linear-layer parameters and encoder FLOPs per 30-s
    window of `model` as it is now."""
    from ..bench import encoder_flops

    linear = sum(p.numel() for m in encoder_linears(model).values() for p in m.parameters() if p.dim() == 2)
    return {"encoder_params": sum(p.numel() for p in model.encoder.parameters()), "encoder_linear_params": linear,
            "encoder_flops": encoder_flops(model)}


def rank_table(plan: Plan) -> str:
    """Per-layer ranks as a markdown table (rank / width, '·' = dense) with the size summary."""
    n = 1 + max(int(k.split(".")[2]) for k in plan.layers)
    keys = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    lines = ["| layer | " + " | ".join(keys) + " |", "| ---: |" + " ---: |" * len(keys)]
    for i in range(n):
        cells = []
        for k in keys:
            r = plan.layers[f"encoder.layers.{i}.{'self_attn.' if k in ATTENTION else ''}{k}"]
            cells.append("·" if r.rank is None else f"{r.rank} ({100 * r.explained:.2f}%)")
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    s = plan.sizes()
    lines.append(f"\nencoder linear parameters: {s['linear_params_after']:,} of {s['linear_params_before']:,} "
                 f"({100 * s['linear_params_after'] / s['linear_params_before']:.1f} %), θ = {plan.threshold}, "
                 f"frame policy = {plan.frame_policy}")
    return "\n".join(lines)


def save_plan(plan: Plan, path: str | os.PathLike) -> Path:
    """Write the plan as JSON, atomically."""
    return atomic.write_text(path, plan.to_json())


def load_plan(path: str | os.PathLike) -> Plan:
    """A plan written by `save_plan` (or `liteasr compress --plan-only`); ValueError names a bad file."""
    try:
        return Plan.from_json(Path(path).read_text())
    except (OSError, json.JSONDecodeError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a liteasr plan ({type(e).__name__}: {e})") from None

