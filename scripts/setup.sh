#!/usr/bin/env bash
# The user install: .venv with what transcribing, compressing and evaluating on a CPU need, and
# nothing GPU-only (no triton, no MLX, no transformers: `pip install -e ".[hf]"`, `".[mlx]"`,
# `".[triton]"` add them; scripts/test.sh adds all the test suite needs). The local CPU torch wheel
# goes in first: a loose torch requirement would otherwise pull a multi-GB CUDA build.
# Idempotent: a second run is quick, and it removes nothing test.sh added.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[eval]"
