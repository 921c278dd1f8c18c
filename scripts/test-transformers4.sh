#!/usr/bin/env bash
# The transformers 4.x leg of CI: tests/test_hf.py against the last 4.x release (liteasr supports
# 4.49+; 5.x is tested by scripts/test.sh in .venv). Creates .venv-tf4 idempotently: the local CPU
# torch wheel first, then transformers 4.57 and liteasr's runtime/test dependencies, then liteasr
# itself without dependencies (so pip does not pull transformers 5 back in).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TF4=${TF4_VERSION:-4.57.6}
V=.venv-tf4
[ -x $V/bin/python ] || "$PY" -m venv $V
$V/bin/python -c "import torch" 2>/dev/null || $V/bin/python -m pip install -q "torch==2.13.0"
if [ "$($V/bin/python -c 'import transformers; print(transformers.__version__)' 2>/dev/null)" != "$TF4" ]; then
  $V/bin/python -m pip install -q "transformers==$TF4" safetensors tokenizers numpy soundfile scipy pytest \
    jiwer whisper-normalizer tqdm "huggingface_hub<1.0"
fi
$V/bin/python -c "import liteasr" 2>/dev/null || $V/bin/python -m pip install -q --no-deps -e .
$V/bin/python -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
$V/bin/python -m pytest -q -rs tests/test_hf.py "$@"
