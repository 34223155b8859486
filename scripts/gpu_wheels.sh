#!/usr/bin/env bash
# Builds .whl/ (ignored by git), the wheels the GPU machine lacks, for benchmarks/gpu_check.sh:
# deepspeed, webdataset and submitit and the pure-Python packages they and dist-llm need that its
# image does not hold (../shared/notes/gpu-machine.md: Python 3.12, torch 2.11, no network).
# Run here, in the repository root, with the venv of scripts/setup.sh; about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
# deepspeed is a source tarball: build its pure-Python wheel with no compiled ops (they JIT there).
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
# Pure-Python packages, any platform.
pure=(webdataset submitit hjson braceexpand pydantic annotated-types typing-inspection)
"$PY" -m pip download -q --no-deps -d .whl $(for p in "${pure[@]}"; do echo "$p==$(version "$p")"; done)
# pydantic's compiled core, for the machine's CPython 3.12 on x86-64.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "pydantic-core==$(version pydantic-core)"
ls -l .whl
du -sh .whl
