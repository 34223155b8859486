"""Train 10 steps through dist-llm's DeepSpeed engine on fixed batches; write losses and final
fp32 weights. Launched by tests with torchrun (several ranks) and compared with a plain PyTorch
reference in the test process.

    torchrun --nproc_per_node 2 tests/train/parity_worker.py OUT.pt ZERO_STAGE DTYPE
"""

import sys

import torch

from dist_llm.config import load_config
from dist_llm.distributed import finish_process, init_world
from dist_llm.model.llama import Llama
from dist_llm.parallel import build_layout
from dist_llm.train.checkpoint import consolidated_state_dict
from dist_llm.train.engine import build_engine
from dist_llm.train.loop import train_step
from dist_llm.train.start import lm_objective

STEPS, GLOBAL_BATCH, SEQ = 10, 8, 32


def config(stage: int, dtype: str, world_size: int):
    return load_config(
        None,
        [
            "model.vocab_size=256",
            "model.dim=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.ffn_hidden=128",
            "model.max_seq_len=64",
            "data.seq_len=32",
            f"parallel.zero_stage={stage}",
            f"train.dtype={dtype}",
            f"train.steps={STEPS}",
            f"train.micro_batch_size={GLOBAL_BATCH // world_size}",
            "optim.warmup_steps=3",
            "optim.lr=0.003",
            "optim.grad_clip=0.5",
        ],
    )


def batches():
    """Two fixed batches in turn: the model can memorize them, so the loss visibly falls."""
    g = torch.Generator().manual_seed(1234)
    two = torch.randint(0, 256, (2, GLOBAL_BATCH, SEQ + 1), generator=g)
    return two[torch.arange(STEPS) % 2]


def main() -> None:
    out, stage, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    world = init_world()
    cfg = config(stage, dtype, world.size)
    torch.manual_seed(0)
    layout = build_layout(cfg, world.rank, world.size)
    engine = build_engine(Llama(cfg.model), cfg, world, layout)
    objective = lm_objective(layout)
    per_rank = GLOBAL_BATCH // world.size
    losses = []
    for tokens in batches():
        mine = tokens[world.rank * per_rank : (world.rank + 1) * per_rank]
        batch = iter([{"input_ids": mine[:, :-1], "labels": mine[:, 1:]}])
        # The production step (dist_llm/train/loop.py), as `dist-llm train` runs it.
        losses.append(train_step(engine, layout, batch, objective, cfg.train.grad_accum, world))
    weights = consolidated_state_dict(engine, cfg, layout)
    if world.rank == 0:
        torch.save({"losses": losses, "weights": weights}, out)
    finish_process()


if __name__ == "__main__":
    main()
