"""Budgeted rank allocation: choose every layer's rank jointly under a size, FLOP or latency budget.

A single θ per layer type spends parameters where the spectrum is flat, not where errors matter.
Here each layer's error at rank k is modelled as

    err_l(k) = s_l · (1 − explained_l(k))

where explained_l is the PCA curve from calibration and s_l the layer's *sensitivity*: the relative
mean-squared error of the final encoder output per unit of discarded variance, measured by
compressing that layer alone on a few probe clips. The ranks minimising Σ err_l subject to
Σ cost_l ≤ budget are found by Lagrangian relaxation (each layer independently minimises
err + λ·cost; λ is bisected) and a greedy pass that spends what is left of the budget. Costs are
parameters, FLOPs (proportional to parameters) or milliseconds measured per matmul shape on the
current device. Ranks are multiples of 16; "dense" is always an option.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import LowRankLinear, Whisper, dense_weight, encoder_linears, set_module
from .calibrate import Calibration

BUDGET_KINDS = ("size", "flops", "latency_ms")


@dataclass(frozen=True)
class Budget:
    """What all ranks must fit into together. Budget("size", 0.6): 60 % of the dense encoder's linear
    parameters; "flops": the same fraction of its linear FLOPs (proportional to the parameters at a
    fixed frame count); "latency_ms": encoder milliseconds per call on the model's device, from
    per-shape matmul timings measured there."""

    kind: str  # one of BUDGET_KINDS
    value: float  # a fraction in (0, 1] for size / flops; milliseconds (> 0) for latency_ms

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"budget kind {self.kind!r} is not one of {', '.join(BUDGET_KINDS)}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ValueError(f"budget value {self.value!r} is not a finite number")
        if self.kind == "latency_ms" and self.value <= 0:
            raise ValueError(f"latency budget must be positive, not {self.value} ms")
        if self.kind != "latency_ms" and not 0 < self.value <= 1:
            raise ValueError(f"{self.kind} budget is a fraction of the dense encoder and must lie in (0, 1], "
                             f"not {self.value}")


@dataclass
class Option:
    rank: int | None  # None = dense
    cost: float
    err: float


def explained(cov: Tensor) -> list[float]:
    """Cumulative explained variance of a covariance (d, d): entry k − 1 is the fraction the top k
    principal directions explain."""
    lam = torch.linalg.eigvalsh(cov).flip(0).clamp(min=0)  # descending
    return (lam.cumsum(0) / lam.sum().clamp(min=1e-30)).tolist()


@torch.no_grad()
def sensitivities(model: Whisper, calib: Calibration, mel: Tensor, probe: float = 0.99) -> dict[str, float]:
    """s_l per encoder linear: relative output MSE per unit discarded variance when layer l alone is
    factored at the rank that explains `probe` of its variance. mel (B, n_mels, 3000) probe clips."""
    ref = model.encoder(mel)
    power = ref.pow(2).mean()
    out = {}
    for name, layer in encoder_linears(model).items():
        mean, cov = calib.output_moments(name, layer)
        cum = explained(cov)
        # the probe rank: the multiple of 16 that explains `probe`, leaving at least 16 directions out
        k = next((k for k in range(16, len(cum) - 15, 16) if cum[k - 1] > probe), max(16, len(cum) - 16))
        discarded = 1.0 - cum[k - 1]
        set_module(model, name, LowRankLinear.from_pca(layer, mean, cov, k))
        err = float((model.encoder(mel) - ref).pow(2).mean() / power)
        set_module(model, name, layer)
        out[name] = err / max(discarded, 1e-9)
    return out


def options(d_in: int, d_out: int, curve: list[float], weight: float, cost) -> list[Option]:
    """Dense plus every multiple-of-16 rank that saves parameters, with modelled error and cost.
    `curve[j]` is the explained variance at rank 16·(j+1); `cost(rank_or_None)` prices an option."""
    opts = [Option(None, cost(None), 0.0)]
    for j, explained in enumerate(curve):
        k = 16 * (j + 1)
        if k * (d_in + d_out) >= d_in * d_out:
            break
        opts.append(Option(k, cost(k), weight * max(0.0, 1.0 - explained)))
    return opts


def solve(layers: dict[str, list[Option]], budget: float) -> dict[str, Option]:
    """Minimise Σ err subject to Σ cost ≤ budget over one option per layer (see module docstring)."""
    def pick(lam: float) -> dict[str, Option]:
        return {n: min(opts, key=lambda o: (o.err + lam * o.cost, o.cost)) for n, opts in layers.items()}

    def total(choice: dict[str, Option]) -> float:
        return sum(o.cost for o in choice.values())

    cheapest = {n: min(opts, key=lambda o: o.cost) for n, opts in layers.items()}
    if total(cheapest) > budget:
        raise ValueError(f"budget {budget:.4g} is below the smallest reachable cost {total(cheapest):.4g} "
                         "(every layer at rank 16)")
    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget:
        hi *= 4
    for _ in range(60):  # bisection on λ: the smallest λ whose choice fits the budget
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(pick(mid)) > budget else (lo, mid)
    choice = pick(hi)
    while True:  # spend the remainder: best error reduction per unit cost that still fits
        left = budget - total(choice)
        moves = [((choice[n].err - o.err) / max(o.cost - choice[n].cost, 1e-12), n, o)
                 for n, opts in layers.items() for o in opts
                 if o.cost > choice[n].cost and o.err < choice[n].err and o.cost - choice[n].cost <= left]
        if not moves:
            return choice
        _, n, o = max(moves, key=lambda m: m[0])
        choice[n] = o


def linear_timings(shapes: set[tuple[int, int]], ranks: dict[tuple[int, int], list[int]], batch_size: int,
                   device: torch.device, dtype: torch.dtype, repeats: int = 5) -> dict[tuple[int, int, int | None], float]:
    """Milliseconds of one linear (dense: rank None) per (d_in, d_out, rank) on this device, at
    M = 1500·batch_size rows: the measured table behind a latency budget."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    table = {}
    for d_in, d_out in sorted(shapes):
        x = torch.randn(1500 * batch_size, d_in, generator=g).to(device, dtype)
        for k in [None] + ranks[(d_in, d_out)]:
            ws = ([torch.randn(d_out, d_in, generator=g).to(device, dtype).T] if k is None else
                  [torch.randn(d_in, k, generator=g).to(device, dtype), torch.randn(k, d_out, generator=g).to(device, dtype)])
            times = []
            for i in range(repeats + 1):
                sync()
                t = time.perf_counter()
                y = x
                for w in ws:
                    y = y @ w
                sync()
                if i:  # the first run is warm-up
                    times.append((time.perf_counter() - t) * 1000)
            table[(d_in, d_out, k)] = statistics.median(times)
    return table


def allocate(model: Whisper, calib: Calibration, mel: Tensor, budget: Budget,
             batch_size: int = 1) -> tuple[dict[str, int | None], dict]:
    """Ranks for every encoder linear under `budget`; returns (ranks, report).

    mel (B, n_mels, 3000): probe windows for the sensitivities. A latency budget is encoder
    milliseconds per call at `batch_size` on the model's device, from measured per-shape timings
    plus the measured time of everything that is not a compressible linear."""
    linears = encoder_linears(model)
    shapes = {name: tuple(reversed(dense_weight(m)[0].shape)) for name, m in linears.items()}  # (d_in, d_out)
    curves = {name: explained(calib.output_moments(name, m)[1])[15::16] for name, m in linears.items()}  # k = 16, 32, …
    weights = sensitivities(model, calib, mel)
    report: dict = {"sensitivity": weights}
    if budget.kind != "latency_ms":
        cost = {n: (lambda k, di=di, do=do: di * do if k is None else k * (di + do)) for n, (di, do) in shapes.items()}
        total = budget.value * sum(di * do for di, do in shapes.values())
    else:
        from ..bench import encoder_latency

        p = next(model.parameters())
        ranks_per_shape: dict = {}
        for di, do in set(shapes.values()):
            ranks_per_shape[(di, do)] = [k for k in range(16, min(di, do) + 1, 16) if k * (di + do) < di * do]
        table = linear_timings(set(shapes.values()), ranks_per_shape, batch_size, p.device, p.dtype)
        dense_linear = sum(table[(di, do, None)] for di, do in shapes.values())
        fixed = max(0.0, encoder_latency(model, batch_size) - dense_linear)
        report.update(fixed_ms=fixed, dense_linear_ms=dense_linear)
        cost = {n: (lambda k, di=di, do=do: table[(di, do, k)]) for n, (di, do) in shapes.items()}
        total = budget.value - fixed
    layers = {n: options(*shapes[n], curves[n], weights[n], cost[n]) for n in linears}
    choice = solve(layers, total)
    report.update(budget=total, cost=sum(o.cost for o in choice.values()),
                  modelled_error=sum(o.err for o in choice.values()))
    return {n: o.rank for n, o in choice.items()}, report
