"""Train two steps, then save twice: our sharded checkpoint (`Saver`) and DeepSpeed's own
files (`engine.save_checkpoint`). Rank 0 writes, as JSON, how our shards assembled whole
compare with DeepSpeed's offline consolidation of its files (zero_to_fp32), the independent
reference.

    torchrun --nproc_per_node N tests/train/shards_worker.py OUT.json CONFIG [overrides...]
"""

import json
import sys
import time
from pathlib import Path

import torch

from dist_llm.checkpoint import load_weights
from dist_llm.config import load_config
from dist_llm.distributed import barrier, finish_process
from dist_llm.model.roles import untie
from dist_llm.train.loop import train_step
from dist_llm.train.start import resolve_precision, start


def main() -> None:
    result_file, config_file, *overrides = sys.argv[1:]
    config, precision = resolve_precision(load_config(config_file, overrides))
    run = start(config, None, precision, time.monotonic())
    batches = iter(run.loader)
    run.engine.train()
    for _ in range(2):
        run.record(
            train_step(run.engine, run.layout, batches, run.objective, config.train.grad_accum, run.world)
        )
    ours_path = run.save(wait=True)
    theirs_root = Path(config.train.out_dir) / "deepspeed"
    run.engine.save_checkpoint(str(theirs_root), tag="step2")
    barrier()
    if run.world.is_main:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ours = untie(load_weights(ours_path, config.model), config.model)
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(theirs_root), tag="step2")
        Path(result_file).write_text(
            json.dumps(
                {
                    "names_equal": sorted(ours) == sorted(theirs),
                    "differ": [k for k, v in theirs.items() if not torch.equal(ours[k], v.float())],
                    "checked": len(theirs),
                }
            )
        )
    run.saver.close()
    finish_process()


if __name__ == "__main__":
    main()
