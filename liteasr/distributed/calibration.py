"""`liteasr compress --ray`: calibration moments accumulated by workers on shards of the clips, summed on the
driver. The shards are cut at batch boundaries, so each worker runs exactly the encoder batches the
single-process `calibrate` runs; only the order of the float64 additions differs (shard totals are added
last), which moves the moments by rounding and leaves the plan's ranks as they are."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..compress.calibrate import Calibration, Moments, calibrate
from .cluster import RayOptions, connect
from .transcriber import ModelSpec


def shards(n: int, batch_size: int, workers: int) -> list[range]:
    """Contiguous index ranges over n clips, one per worker (fewer when there are fewer batches), each a whole
    number of batches of `batch_size` (the last batch of the last shard may be short, as in one process)."""
    batches = -(-n // batch_size)
    k = max(1, min(workers, batches))
    cuts = [i * batches // k * batch_size for i in range(k)] + [n]
    return [range(a, min(b, n)) for a, b in zip(cuts, cuts[1:])]


def _shard_moments(spec: ModelSpec, audio: list, frame_policy: str, batch_size: int,
                   layers: list[int] | None) -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
    """Worker task: {site: (rows, sum (d,), gram (d, d))} in float64 over this shard's clips."""
    calib = calibrate(spec.load_model(), audio, frame_policy, batch_size, progress=False, layers=layers)
    return {k: (m.n, m.sum.cpu().numpy(), m.gram.cpu().numpy()) for k, m in calib.sites.items()}


def calibrate_ray(spec: ModelSpec, audio: list, frame_policy: str = "audio", batch_size: int = 8,
                  ray_options: RayOptions = RayOptions(), ids: list[str] | None = None,
                  layers: list[int] | None = None, progress: bool = True) -> Calibration:
    """liteasr.compress.calibrate on Ray: `ray_options.workers` tasks each load the (dense) model named by
    `spec` and stream one shard of `audio` (paths readable from every node, or arrays); the driver adds their
    float64 sums and Gram matrices in shard order. Moments live on the CPU. Each shard's moments travel through
    the object store: 4 sites × layers × d² float64 (1.7 GB for large-v3), so the driver adds one at a time."""
    import ray
    from tqdm import tqdm

    connect(ray_options)
    t0 = time.perf_counter()
    task = ray.remote(num_cpus=ray_options.cpus_per_worker, num_gpus=ray_options.gpus_per_worker)(_shard_moments)
    refs = [task.remote(spec, [audio[i] for i in part], frame_policy, batch_size, layers)
            for part in shards(len(audio), batch_size, ray_options.workers)]
    sites: dict[str, Moments] = {}
    for _ in tqdm(range(len(refs)), unit="shard", desc="calibrate", disable=not progress):
        ref = refs.pop(0)  # dropped once added: the object store frees each shard's moments as it goes
        for name, (n, total, gram) in ray.get(ref).items():
            m = sites.setdefault(name, Moments(len(total)))
            m.n += n
            m.sum += torch.from_numpy(total)
            m.gram += torch.from_numpy(gram)
    clip_ids = ids or [str(a) if isinstance(a, str) else f"array{i}" for i, a in enumerate(audio)]
    return Calibration(sites, clip_ids, frame_policy, time.perf_counter() - t0)
