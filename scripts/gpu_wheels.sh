#!/usr/bin/env bash
# Downloads into .whl/ the wheels scripts/gpu_check.sh installs (offline) on a GPU machine whose image lacks them or
# holds other versions: this repository's transformers, peft and accelerate as installed in .venv, and omegaconf.
# All are pure Python (about 15 MB). The GPU machine has no network: run this here, then carry .whl/ along
# (git ignores it: name it in the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl \
  "transformers==$(version transformers)" "peft==$(version peft)" "accelerate==$(version accelerate)" \
  "omegaconf==$(version omegaconf)"
ls -l .whl
