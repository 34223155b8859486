"""Resume a checkpoint in the layout given on the command line and compare the restored state,
assembled by DeepSpeed's own API (safe_get_full_*), with the checkpoint's shards assembled
whole: fp32 weights, Adam moments, step, learning rate. Rank 0 writes the largest
differences as JSON.

    torchrun --nproc_per_node N tests/parallel/resume_worker.py CHECKPOINT OUT.json TP PP ZERO
"""

import json
import sys
from pathlib import Path

from dist_llm.checkpoint import SHARDS, load_weights, read_meta, sharded
from dist_llm.config import load_config
from dist_llm.distributed import finish_process, init_world
from dist_llm.train import checkpoint
from dist_llm.train.start import build_training


def main() -> None:
    path, out, tp, pp, zero = (
        Path(sys.argv[1]),
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        int(sys.argv[5]),
    )
    world = init_world()
    saved = read_meta(path)["config"]
    config = load_config(
        None,
        [f"model.{k}={json.dumps(v)}" for k, v in saved["model"].items()]  # JSON is YAML
        + [f"optim.{k}={v}" for k, v in saved["optim"].items()]
        + [
            f"train.steps={saved['train']['steps']}",
            f"train.micro_batch_size={saved['train']['micro_batch_size']}",
            f"train.grad_accum={saved['train']['grad_accum']}",
            f"data.seq_len={saved['data']['seq_len']}",
            f"train.dtype={saved['train']['dtype']}",
            f"parallel.tensor={tp}",
            f"parallel.pipeline={pp}",
            f"parallel.zero_stage={zero}",
            "checkpoint.data_state=restart",
        ],
    )
    layout, engine = build_training(config, world, path)
    step, _, _ = checkpoint.resume(engine, config, world, layout, path)
    weights = checkpoint.consolidated_state_dict(engine, config, layout)
    moments = checkpoint.consolidated_moments(engine, config, layout)
    if world.is_main:
        want_w = load_weights(path, config.model)
        names = [n for n in sharded.specs(path / SHARDS) if not n.startswith("model/")]
        want_m = sharded.read_full(path / SHARDS, names)
        result = {
            "step": step,
            "global_steps": engine.global_steps,
            "lr": engine.get_lr()[0],
            "weights": max((weights[k] - v).abs().max().item() for k, v in want_w.items()),
            "moments": max((moments[k] - v).abs().max().item() for k, v in want_m.items()),
            "moment_keys_equal": sorted(moments) == sorted(want_m),
            "checked": len(want_w) + len(want_m),
        }
        Path(out).write_text(json.dumps(result))
    finish_process()


if __name__ == "__main__":
    main()
