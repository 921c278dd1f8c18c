#!/usr/bin/env bash
# Packs what the Ray-on-GPU overhead run needs into two carries of at most 64 MiB each (the lent GPU machine
# has no network and no Ray): .gpu/ray1 = Ray 2.60 (its wheel unpacked without the Java jars and RLlib, xz'd:
# 79 -> 32 MB) + jsonschema/soundfile wheels + 100 speech-dev clips + the first 18 MB of tiny.en's model.bin;
# .gpu/ray2 = the rest of tiny.en. On the machine, two consecutive calls (it stays warm 30 s):
#   call 1 (carry .gpu/ray1): mkdir -p /tmp/site /tmp/m && tar -xJf .gpu/ray1/ray.tar.xz -C /tmp/site &&
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/ray1/*.whl &&
#     cp .gpu/ray1/model.bin.a /tmp/m/ && cp -r .gpu/ray1/speech /tmp/speech
#   call 2 (carry .gpu/ray2): bash benchmarks/ray_gpu_run.sh 2000; a third call: bash benchmarks/ray_gpu_run.sh 16000
set -euo pipefail
cd "$(dirname "$0")/.."
W=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$W" \
  ray==2.60.0 jsonschema==4.26.0 referencing==0.37.0 rpds-py==2026.9.1 jsonschema-specifications==2025.9.1 \
  soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
mkdir -p .gpu/ray1 .gpu/ray2/tiny.en "$W/x"
(cd "$W/x" && unzip -q "$W"/ray-2.60.0-*.whl && tar -cf - --exclude=ray/jars --exclude=ray/rllib ray ray-2.60.0.dist-info \
  | xz -T2 -6 > "$OLDPWD/.gpu/ray1/ray.tar.xz")
cp "$W"/*.whl .gpu/ray1/ && rm .gpu/ray1/ray-2.60.0-*.whl
python3 - <<'PY'
import json, shutil
from pathlib import Path
src, dst = Path("../shared/data/speech-dev"), Path(".gpu/ray1/speech")
(dst / "audio").mkdir(parents=True, exist_ok=True)
rows = [json.loads(line) for line in open(src / "manifest.jsonl")][::3][:100]  # every third clip: all domains
with open(dst / "manifest.jsonl", "w") as f:
    for r in rows:
        shutil.copy(src / r["audio"], dst / r["audio"])
        f.write(json.dumps(r) + "\n")
PY
M=~/.cache/liteasr/tiny.en
head -c 18000000 $M/model.bin > .gpu/ray1/model.bin.a
tail -c +18000001 $M/model.bin > .gpu/ray2/tiny.en/model.bin.b
cp $M/config.json $M/tokenizer.json $M/vocabulary.txt .gpu/ray2/tiny.en/
du -sb .gpu/ray1 .gpu/ray2
rm -rf "$W"
