#!/usr/bin/env bash
# One call on the lent GPU machine (no network): real-weight CUDA transcripts against the CPU's, the
# requires_cuda tests, beam-vs-greedy cost in the graph runtime, the server under load. Expects, under .gpu/:
# serve/ (benchmarks/serve_load.py prepare --model base), p1..pN/ (its weight parts, carried by earlier calls),
# ct/ (check-clip audio + the CPU transcripts from benchmarks/check_transcripts.py), tok/ (tiny.en tokenizer.json),
# and .whl/ (the serve extra's and soundfile's wheels for the machine's Python). Logs and JSON go to $OUT.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv | tee $OUT/gpu.txt
PARTS=$(echo .gpu/p*)
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from serve_load import open_bundle; from pathlib import Path; \
print(open_bundle(Path('.gpu/serve'), [Path(p) for p in '$PARTS'.split()]))" || exit 1
M=.gpu/serve/model
for rt in cuda-fp32 cuda-fp16; do
  for mode in plain default; do
    flag=$([ $mode = plain ] && echo --plain-greedy)
    timeout 120 python3 benchmarks/check_transcripts.py --model $M --device cuda --runtime $rt $flag \
      --audio .gpu/ct/check-audio.npz --out $OUT/ct-base-$mode-$rt.json 2>&1 | tail -2
    python3 - "$OUT/ct-base-$mode-$rt.json" ".gpu/ct/base-$mode.json" "$mode $rt" <<'PY'
import json, sys
g, c = (json.load(open(f)) for f in sys.argv[1:3])
same = sum(a["text"] == b["text"] for a, b in zip(g["short"], c["short"]))
segs = sum(a["segments"] == b["segments"] for a, b in zip(g["short"], c["short"]))
print(f"{sys.argv[3]}: {same}/{len(c['short'])} texts, {segs} segment lists identical to the CPU; "
      f"long-form text {'identical' if g['long']['text'] == c['long']['text'] else 'DIFFERENT'}")
for a, b in zip(g["short"], c["short"]):
    if a["text"] != b["text"]:
        print("   cpu :", b["text"][:160], "\n   cuda:", a["text"][:160])
PY
  done
done 2>&1 | tee $OUT/real-weights.log
LITEASR_TEST_TOKENIZER_DIR=.gpu/tok timeout 200 python3 -m pytest -q -p no:cacheprovider -m requires_cuda \
  tests/test_runtime.py tests/test_kernels.py tests/test_fused.py 2>&1 | tail -15 | tee $OUT/gpu-tests.log
(cd benchmarks && timeout 90 python3 decoding_gpu.py --batch-sizes 1 8 32 --tokens 100 \
  --output $OUT/decoding-gpu-h200.json) 2>&1 | tail -12 | tee $OUT/decoding-gpu.log
timeout 170 python3 benchmarks/serve_load.py --bundle .gpu/serve --parts-dir $PARTS --device cuda --clients 1 8 32 64 \
  --requests 128 --clips 128 --long-s 600 --max-batch-size 32 --threads 8 --output $OUT/serve-load-h200-base.json \
  2>&1 | tail -40 | tee $OUT/serve-load.log
