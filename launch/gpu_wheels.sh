#!/usr/bin/env bash
# Fetch into .whl/ the wheels that launch/gpu_check.sh needs on the lent GPU machine and its image lacks
# (Python 3.12, x86-64; torch, transformers, numpy, psutil, einops, msgpack, ninja, py-cpuinfo are there).
# The versions are the ones this project's .venv holds. Total ~5 MB; .whl/ is git-ignored and travels by `carry`.
#   bash launch/gpu_wheels.sh        # then: device run with carry [".whl"]: bash launch/gpu_check.sh "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ver() { "$PY" -m pip show "$1" | sed -n 's/^Version: //p'; }
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for pkg in hydra-core omegaconf antlr4-python3-runtime pydantic pydantic-core annotated-types typing-inspection hjson; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .whl "$pkg==$(ver "$pkg")" 2>/dev/null \
  || "$PY" -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: -d .whl "$pkg==$(ver "$pkg")" \
  || "$PY" -m pip wheel -q --no-deps -w .whl "$pkg==$(ver "$pkg")"   # sdist only: build a pure-python wheel
done
# DeepSpeed ships as a source distribution: build a pure-python wheel (no ops compiled; they JIT-build on use).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(ver deepspeed)"
ls -la .whl
du -sh .whl
