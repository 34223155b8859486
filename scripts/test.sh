#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite: lint, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k stream`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-slurm.sh # the local SLURM cluster of tests/slurm
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
ruff format --check .
lint-imports # the layering of dist_llm/ (pyproject.toml, docs/architecture.md)
python -m pytest -q "$@"
