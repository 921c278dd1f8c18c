"""Where the work runs: a local Ray started by the command itself, or an existing cluster."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a distributed run goes; the CLI's --address/--workers/... map onto these."""

    address: str | None = None  # an existing cluster ("auto", "ray://host:10001", …); None: start a local Ray
    num_cpus: int | None = None  # CPUs of the local Ray (None: the cores, at least the workers' + 2); unused with an address
    workers: int = 1  # transcriber actors (or calibration shards)
    cpus_per_worker: float = 1.0  # CPU threads of each worker (Ray sets OMP_NUM_THREADS to it)
    gpus_per_worker: float = 0.0  # 1: one GPU per worker; fractions pack several workers on one GPU

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError(f"RayOptions: workers >= 1, cpus_per_worker > 0 and gpus_per_worker >= 0 "
                             f"(got {self.workers}, {self.cpus_per_worker}, {self.gpus_per_worker})")


def connect(options: RayOptions) -> None:
    """Join the cluster at options.address, or start a local Ray with options.num_cpus CPUs; a no-op when this
    process is connected already (tests, notebooks and the CLI share one session)."""
    import ray

    if ray.is_initialized():
        return
    if options.address is not None:
        ray.init(address=options.address)
    else:
        # Ray Data's read tasks need CPU slots beside the workers' (fewer starve the pipeline on a 2-core machine).
        need = int(options.workers * options.cpus_per_worker) + 2
        # No dashboard: a dozen processes that a batch run started from the command line has no use for.
        ray.init(num_cpus=options.num_cpus or max(need, os.cpu_count() or 1), include_dashboard=False)
