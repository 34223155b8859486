#!/usr/bin/env bash
# The whole GPU check, for the one time a GPU machine is lent (issue 14 item 4). Written and run
# here on CPU only up to the first CUDA call: not yet run on a GPU.
#
#   here:   bash scripts/gpu_wheels.sh          # .whl/: deepspeed, webdataset, submitit, pydantic
#   there:  bash benchmarks/gpu_check.sh        # the device tool's run, carry [".whl"], timeout ~540 s
#
# Installs the carried wheels into /tmp/site, then, each step under its own time limit so that one
# hang cannot eat the lease (~8 minutes in all on an H200): the CUDA checks (benchmarks/gpu_check.py),
# the CPU-side unit tests that touch the optimizer and planner, NCCL with 2 processes on the one GPU,
# and bench_train on the 1B preset in bf16 (eager and compiled) with the % of the measured dense bf16
# matmul peak (~790 TFLOP/s on an H200). Everything goes to $OUT/gpu_check.txt.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/work/gpu_check}
mkdir -p "$OUT"
RESULTS=$OUT/gpu_check.txt
exec > >(tee "$RESULTS") 2>&1
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_extensions DS_BUILD_OPS=0
step() { echo; echo "=== $1 ($(date +%T))"; }

step "install the carried wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, deepspeed, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"

step "CUDA checks: fused AdamW resumes bitwise, bf16 CUDA vs fp32 CPU, flex vs SDPA"
timeout 120 python3 benchmarks/gpu_check.py; echo "rc=$?"

step "unit tests (optimizer kernel, planner against published runs, precision choice)"
timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/plan tests/test_precision.py tests/train/test_schedule.py; echo "rc=$?"

step "NCCL: 2 processes on the one GPU"
timeout 60 python3 -m torch.distributed.run --nproc_per_node 2 --master_port 29533 benchmarks/gpu_check.py --nccl-rank 2>&1 | tail -5

step "bench_train: 1B preset, bf16, batch 4 x 2048, eager and compiled (of peak = of the measured 8192^3 matmul)"
# All five variants (~100 GB of model states at 1.24B parameters), then the compiled step beside
# HF's alone (one more engine would not fit beside the five).
B="python3 benchmarks/bench_train.py --config configs/model/1b.yaml --dtype bf16 --batch 4 --seq 2048 --steps 5 --repeat 2"
timeout 200 $B 2>&1 | grep -v -i "warn"; echo "rc=${PIPESTATUS[0]}"
timeout 200 $B --compile --skip alone,hf-ds --no-accelerate 2>&1 | grep -v -i "warn"; echo "rc=${PIPESTATUS[0]}"

step "done"
