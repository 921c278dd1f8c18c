"""LiteASR compression: calibrate -> PCA -> ranks (the plan) -> factor -> swap modules in place.

1. `calibrate` (calibrate.py) streams speech through the encoder and keeps float64 moments, from
   which every linear's output mean and covariance follow exactly.
2. `make_plan` (plan.py) picks each linear's rank from its output spectrum at θ, or `allocate`
   (allocate.py) picks all ranks jointly under a `Budget`; `apply_plan` factors and swaps.
3. `recover` (recover.py) optionally distils the factored encoder toward the dense one.
`sweep.py` runs many points from one calibration and is imported on its own (`liteasr.compress.sweep`).

`compress()` below drives the three steps from one frozen `CompressConfig`. The root package binds
the *function* as `liteasr.compress` (so `liteasr.compress(model, audio, config)` works); the names
of this subpackage are reached with `from liteasr.compress import CompressConfig, Plan, ...`.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import asdict, dataclass, field, replace

from ..model import Whisper
from .allocate import Budget, allocate
from .calibrate import FRAME_POLICIES, MIN_CLIPS, Calibration, calibrate, select_calibration
from .plan import (Plan, apply_plan, footprint, load_plan, make_plan, parse_threshold, rank_table,
                   save_plan)
from .recover import recover

__all__ = ["CompressConfig", "Budget", "Plan", "Report", "compress", "plan_only", "compress_with_report",
           "calibrate", "select_calibration", "Calibration", "make_plan", "apply_plan", "allocate", "recover",
           "footprint", "rank_table", "save_plan", "load_plan", "parse_threshold", "FRAME_POLICIES", "MIN_CLIPS"]


@dataclass(frozen=True)
class CompressConfig:
    """How to compress: one rank rule (θ, a saved plan, or a budget), the statistics, and recovery."""

    threshold: str | float | tuple[float, float] = "0.99:0.999"  # θ, θ_attn:θ_mlp or preset a|b|c; unused with plan/budget
    frame_policy: str = "audio"  # statistics over encoder frames of real "audio" or "all" 1500 (padding too)
    batch_size: int = 8  # calibration clips per encoder call
    sequential: bool = False  # calibrate layer by layer on the already-factored layers' outputs
    budget: Budget | None = None  # choose all ranks jointly under this budget instead of one θ per type
    plan: Plan | None = None  # apply this plan's ranks instead of searching; sets θ and frame policy to its own
    recover_steps: int = 0  # distil the factored encoder toward the dense one for this many steps (0: off)
    progress: bool = True  # tqdm bars

    def __post_init__(self) -> None:
        parse_threshold(self.threshold)  # a malformed θ fails here, not after minutes of calibration
        if self.frame_policy not in FRAME_POLICIES:
            raise ValueError(f"frame_policy must be one of {FRAME_POLICIES}, not {self.frame_policy!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")
        if self.recover_steps < 0:
            raise ValueError(f"recover_steps must be 0 (off) or positive, not {self.recover_steps}")
        if self.budget is not None and not isinstance(self.budget, Budget):
            raise ValueError(f"budget must be a Budget(kind, value), not {self.budget!r}")
        if self.budget is not None and self.plan is not None:
            raise ValueError("give a plan or a budget, not both: each decides every rank")
        if self.plan is not None:  # a saved plan brings the θ and statistics its ranks were chosen with
            object.__setattr__(self, "threshold", self.plan.threshold)
            object.__setattr__(self, "frame_policy", self.plan.frame_policy)


def plan_only(model: Whisper, audio: list, config: CompressConfig = CompressConfig(), ids: list[str] | None = None,
              calibration: Calibration | None = None) -> Plan:
    """The plan `compress` would apply, leaving `model` as it is. Sequential calibration needs the
    factored prefix, so a sequential plan is found by compressing a copy of the model."""
    if config.sequential:
        return compress(copy.deepcopy(model), audio, replace(config, recover_steps=0), ids=ids)
    _check_clips(audio)
    calib = _calibration(model, audio, config, ids, calibration)
    ranks, allocation = _ranks(model, calib, audio, config)
    plan = make_plan(model, calib, config.threshold, ranks)
    plan.allocation = allocation
    return plan


def compress(model: Whisper, audio: list, config: CompressConfig = CompressConfig(), ids: list[str] | None = None,
             refs: list[str] | None = None, calibration: Calibration | None = None) -> Plan:
    """Compress `model`'s encoder in place with LiteASR; returns the Plan (its `.ranks` is {name: rank}).

    audio: calibration clips, paths or 16-kHz float arrays (at least MIN_CLIPS); ids: their names
    for the plan (default: the paths). refs: transcripts aligned with `audio`, the references of
    recovery's held-out check (default: the dense model's own transcripts). calibration: statistics
    already collected on this still-dense model with the same clips and frame policy (e.g. by a
    sweep), used instead of a first calibration pass.
    """
    _check_clips(audio)
    teacher = copy.deepcopy(model) if config.recover_steps else None  # the dense model, before any swap
    # Sequential: ranks (θ's, or a budget's from the dense statistics) then each layer's factors from
    # statistics of the already-factored prefix, one pass per layer that stops after it.
    dense = None if config.sequential and config.budget is None else _calibration(model, audio, config, ids,
                                                                                   calibration)
    ranks, allocation = _ranks(model, dense, audio, config)
    plan = None
    for layers in [[i] for i in range(len(model.encoder.layers))] if config.sequential else [None]:
        calib = dense if layers is None else calibrate(model, audio, config.frame_policy, config.batch_size,
                                                       config.progress, ids, layers)
        part = make_plan(model, calib, config.threshold, ranks)
        apply_plan(model, calib, part)
        if plan is None:
            plan = part
        else:
            plan.layers.update(part.layers)
            plan.calibration_s += part.calibration_s
    plan.sequential, plan.allocation = config.sequential, allocation
    if teacher is not None:
        plan.recovery = recover(model, teacher, audio, steps=config.recover_steps, refs=refs, progress=config.progress)
    return plan


@dataclass
class Report:
    """What one compression did: compression.json of a `liteasr compress` output directory."""

    plan: Plan
    before: dict[str, int]  # footprint() of the dense model: encoder_params, encoder_linear_params, encoder_flops
    after: dict[str, int]  # footprint() of the compressed model
    seconds: float  # wall time of calibration, rank choice, factoring and recovery
    peak_rss_mb: float  # the process's peak resident memory at the end (model loading included)
    calibration: list[str] = field(default_factory=list)  # calibration clip ids (keep them out of evaluation)

    @property
    def encoder_fraction(self) -> float:
        return self.after["encoder_params"] / self.before["encoder_params"]

    @property
    def linear_fraction(self) -> float:
        return self.after["encoder_linear_params"] / self.before["encoder_linear_params"]

    def to_dict(self, model_name: str | None = None) -> dict:
        """The JSON layout of compression.json (read back by `liteasr export-hf` and `eval --exclude-split`)."""
        return {"model": model_name, "threshold": list(self.plan.threshold), "frame_policy": self.plan.frame_policy,
                "calibration": self.calibration, "before": self.before, "after": self.after,
                "encoder_fraction": self.encoder_fraction, "linear_fraction": self.linear_fraction,
                "seconds": self.seconds, "peak_rss_mb": self.peak_rss_mb, "recovery": self.plan.recovery,
                "plan": asdict(self.plan)}


def compress_with_report(model: Whisper, audio: list, config: CompressConfig = CompressConfig(),
                         ids: list[str] | None = None, refs: list[str] | None = None,
                         calibration: Calibration | None = None) -> Report:
    """`compress` plus the measurements around it (sizes and FLOPs before and after, time, peak memory);
    `calibration` as in `compress` (e.g. moments summed over Ray workers)."""
    import resource  # POSIX only: imported here so that `import liteasr` works everywhere

    before = footprint(model)
    start = time.perf_counter()
    plan = compress(model, audio, config, ids=ids, refs=refs, calibration=calibration)
    seconds = round(time.perf_counter() - start, 2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return Report(plan, before, footprint(model), seconds, round(peak, 1), list(ids or plan.calibration))


def _check_clips(audio: list) -> None:
    if len(audio) < MIN_CLIPS:
        raise ValueError(f"calibration set has {len(audio)} clips; at least {MIN_CLIPS} are needed")


def _calibration(model: Whisper, audio: list, config: CompressConfig, ids: list[str] | None,
                 given: Calibration | None) -> Calibration:
    """`given` when it holds the statistics this config asks for, else a fresh pass over all layers."""
    if given is None:
        return calibrate(model, audio, config.frame_policy, config.batch_size, config.progress, ids)
    if given.frame_policy != config.frame_policy:
        raise ValueError(f"the given calibration has frame policy {given.frame_policy!r}, "
                         f"the config {config.frame_policy!r}")
    return given


def _ranks(model: Whisper, calib: Calibration | None, audio: list, config: CompressConfig) -> tuple[dict | None, dict]:
    """(ranks, allocation report): a budget's (allocate.py), the config's plan's, or None (θ decides per layer)."""
    if config.budget is None:
        return (config.plan.ranks if config.plan else None), {}
    return allocate(model, calib, _probe_mel(model, audio), config.budget)


def _probe_mel(model: Whisper, audio: list, n: int = 4):
    """Log-mel windows (n, n_mels, 3000) of the first n calibration clips, for sensitivity probes."""
    from ..audio import mel_batch

    p = next(model.parameters())
    return mel_batch(audio[:n], model.dims.num_mel_bins, p.device, p.dtype)[0]
