"""Train 10 (or steps=N) fp32 steps in a (tensor, pipeline, context, data) layout on fixed
batches; write the mean losses and the gathered full fp32 weights. Launched with torchrun by test_parity.py, which
compares them with a plain single-process PyTorch loop.

    torchrun --nproc_per_node N tests/parallel/parity_worker.py OUT.pt TP PP VARIANT [zero=S] [recompute] [sp] [cp=C] [unscored=U] [ep=E] [steps=N]
"""

import sys

import torch

from dist_llm.config import load_config
from dist_llm.distributed import finish_process, init_world
from dist_llm.parallel import build_layout, build_model, gather_full, init_source
from dist_llm.train.checkpoint import master_weight
from dist_llm.train.engine import build_engine
from dist_llm.train.loop import train_step
from dist_llm.train.start import lm_objective, prepare_blocks

STEPS, GLOBAL_BATCH, SEQ = 10, 8, 32
VARIANTS = {
    # untied, vocabulary divisible by the TP size
    "plain": ["model.vocab_size=256"],
    # tied embeddings (a TiedLayerSpec across the first and last stage) and a vocabulary that
    # must be padded to a multiple of the TP size
    "tied": ["model.vocab_size=255", "model.tie_embeddings=true"],
    # as many key/value heads as query heads: tp2 x cp2 leaves each rank one of each
    "mha": ["model.vocab_size=255", "model.tie_embeddings=true", "model.n_kv_heads=4"],
    # a mixture of experts (every other layer, four experts, top-2, dropless) with both router
    # losses, for expert parallelism
    "moe": [
        "model.vocab_size=256",
        "model.moe.num_experts=4",
        "model.moe.every=2",
        "model.moe.expert_hidden=64",
        "model.moe.aux_loss_coef=0.05",
        "model.moe.z_loss_coef=0.01",
        # Adam divides by sqrt(v) + eps: at 1e-8, embedding rows whose gradients are tiny turn
        # the experts' reduction-order differences into 1.7e-5 of weight after 10 steps on the
        # Intel Xeon kind (within 1e-5 on the AMD kind); 1e-6 keeps the comparison on
        # what the layouts compute.
        "optim.eps=1e-6",
    ],
}


def config(
    variant: str,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    zero: int = 1,
    sp: bool = False,
    cp: int = 1,
    ep: int = 1,
    steps: int = STEPS,
):
    accum = 2 if pp > 1 else 1  # a pipeline needs micro-batches to overlap
    return load_config(
        None,
        [
            "model.dim=64",
            "model.n_layers=4",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            *VARIANTS[variant],  # after the shape, which it may change
            "model.ffn_hidden=128",
            "model.max_seq_len=64",
            "data.seq_len=32",
            f"parallel.tensor={tp}",
            f"parallel.pipeline={pp}",
            f"parallel.zero_stage={zero}",
            f"parallel.sequence_parallel={str(sp).lower()}",
            f"parallel.context={cp}",
            f"parallel.expert={ep}",
            "train.dtype=fp32",
            f"train.steps={steps}",
            f"train.grad_accum={accum}",
            f"train.micro_batch_size={GLOBAL_BATCH // dp // accum}",
            f"optim.warmup_steps={min(3, steps - 1)}",
            "optim.lr=0.003",
            "optim.grad_clip=0.5",
        ],
    )


def batches(vocab: int, steps: int = STEPS):
    """Two fixed batches in turn: the model can memorize them, so the loss visibly falls."""
    g = torch.Generator().manual_seed(1234)
    two = torch.randint(0, vocab, (2, GLOBAL_BATCH, SEQ + 1), generator=g)
    return two[torch.arange(steps) % 2]


def documents() -> torch.Tensor:
    """Document ids of every batch's rows: packed rows of one to three documents, the boundaries
    different in each row, so every layout runs (and must match) document-masked attention."""
    cuts = torch.tensor([[SEQ, SEQ], [5, SEQ], [9, 20], [1, 31], [16, 17], [30, SEQ], [3, 11], [24, 28]])
    position = torch.arange(SEQ)
    return (position >= cuts[:, :1]).int() + (position >= cuts[:, 1:]).int()


def labels(tokens: torch.Tensor, unscored: int) -> torch.Tensor:
    """Next-token labels, the first `unscored` positions of each row not scored (-100)."""
    out = tokens[:, 1:].clone()
    out[:, :unscored] = -100
    return out


def main() -> None:
    out, tp, pp, variant = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    options = sys.argv[5:]
    zero = next((int(o.split("=")[1]) for o in options if o.startswith("zero=")), 1)
    cp = next((int(o.split("=")[1]) for o in options if o.startswith("cp=")), 1)
    ep = next((int(o.split("=")[1]) for o in options if o.startswith("ep=")), 1)
    steps = next((int(o.split("=")[1]) for o in options if o.startswith("steps=")), STEPS)
    # -100 labels on the first positions: under context parallelism one rank scores fewer tokens
    unscored = next((int(o.split("=")[1]) for o in options if o.startswith("unscored=")), 0)
    world = init_world()
    dp = world.size // (tp * pp * cp)
    cfg = config(variant, tp, pp, dp, zero, sp="sp" in options, cp=cp, ep=ep, steps=steps)
    layout = build_layout(cfg, world.rank, world.size)
    model = build_model(cfg.model, layout, init_source(cfg.model, cfg.train.seed), world.device)
    if "recompute" in options:
        prepare_blocks(model, recompute=True)
    engine = build_engine(model, cfg, world, layout)
    objective = lm_objective(layout)
    per_rank = GLOBAL_BATCH // dp
    micro = cfg.train.micro_batch_size
    losses = []
    mine = slice(layout.dp_rank * per_rank, (layout.dp_rank + 1) * per_rank)
    for tokens in batches(cfg.model.vocab_size, steps):
        parts = iter(
            {"input_ids": t[:, :-1], "labels": labels(t, unscored), "document_ids": d}
            for t, d in zip(tokens[mine].split(micro), documents()[mine].split(micro), strict=True)
        )
        # The production step (dist_llm/train/loop.py), as `dist-llm train` runs it.
        losses.append(train_step(engine, layout, parts, objective, cfg.train.grad_accum, world))
    weights = gather_full(engine.module, cfg.model, layout, master_weight)
    if world.rank == 0:
        torch.save({"losses": losses, "weights": weights}, out)
    finish_process()


if __name__ == "__main__":
    main()
