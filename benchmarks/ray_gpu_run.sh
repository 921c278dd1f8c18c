#!/usr/bin/env bash
# Call 2+ of the Ray-on-GPU overhead run (see ray_gpu_bundle.sh): joins tiny.en, then times the Ray pipeline
# with one GPU worker against in-process batched transcribe on N clips (the 100 carried ones, repeated).
# Usage on the lent machine: bash benchmarks/ray_gpu_run.sh N
set -u
N=${1:-2000}
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/tmp/site:$PWD
if [ ! -f /tmp/m/model.bin ]; then
  cat /tmp/m/model.bin.a .gpu/ray2/tiny.en/model.bin.b > /tmp/m/model.bin && rm /tmp/m/model.bin.a \
    && cp .gpu/ray2/tiny.en/*.json .gpu/ray2/tiny.en/*.txt /tmp/m/ || exit 1
fi
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 540 python3 benchmarks/ray_overhead.py --device cuda --model /tmp/m --manifest /tmp/speech/manifest.jsonl \
  --clips "$N" --batch-size 32 --threads 8 --num-cpus 16 --repeats $([ "$N" -gt 4000 ] && echo 1 || echo 2) 2>&1 \
  | grep -v -E "^\(|INFO|WARNING|core_worker" | tee "$OUT/ray-overhead-gpu-$N.log"
