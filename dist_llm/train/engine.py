"""Build the DeepSpeed engine from the config: ZeRO stage, precision, optimizer, schedule."""

from __future__ import annotations

import torch
from torch import nn

from dist_llm.config import Config
from dist_llm.distributed import World
from dist_llm.parallel import Layout
from dist_llm.train.schedule import lr_multiplier


def deepspeed_config(config: Config, dp_size: int) -> dict:
    t, p = config.train, config.parallel
    if t.dtype == "auto":
        raise ValueError(
            "train.dtype=auto: resolve it for this machine first (train.start.resolve_precision)"
        )
    ds: dict = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        # Under a pipeline these are the micro-batches of DeepSpeed's 1F1B schedule.
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp_size,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        # Our optimizer is torch's AdamW (no compiled op, bit-exact resume); DeepSpeed must be
        # told that this is deliberate.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if p.pipeline > 1 and p.sequence_parallel:
        # DeepSpeed splits activations over the TP group between stages on the assumption that
        # every TP rank holds the same ones; with sequence parallelism each holds its own.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if t.dtype == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.dtype == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if p.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if p.zero_stage == 3:
        # Pinned: `gradient_scale` corrects the path this selects (its alternative, the
        # contiguous all-reduce, is taken only for buckets under reduce_bucket_size).
        ds["zero_optimization"]["reduce_scatter"] = True
    return ds


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linears, embeddings); never norms. Tied weights appear once. Frozen
    parameters (a LoRA run's base) are in no group: they hold no optimizer state."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters() yields a shared tensor once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # DeepSpeed drops empty groups (LoRA has no norms)


def adamw_kernel(implementation: str, device: torch.device) -> dict:
    """torch AdamW's keyword for the kernel. Fused (one kernel over every tensor) is ~10x the
    per-parameter loop on a CPU core (benchmarks/bench_train.py) and the fastest on GPUs; each
    kernel is deterministic, so a resumed run stays bitwise the same as long as it is the same."""
    if implementation == "auto":
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        implementation = "fused" if device.type in _get_fused_kernels_supported_devices() else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[
        implementation
    ]


def build_engine(model: nn.Module, config: Config, world: World, layout: Layout | None = None):
    """DeepSpeed engine over `model` (a PipelineModule gives a PipelineEngine). With tensor
    parallelism the layout's grid is DeepSpeed's `mpu`: ZeRO then partitions and reduces over
    the data-parallel group only, and counts split parameters once in the gradient norm."""
    import deepspeed

    o = config.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        **adamw_kernel(o.implementation, world.device),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(o, config.train.steps))
    dp_size = layout.deepspeed_dp if layout is not None else world.size
    mpu = layout.grid if layout is not None and not layout.pipelined else None
    ds_config = deepspeed_config(config, dp_size)
    if config.parallel.zero_stage == 3 and layout is not None and layout.cp > 1:
        _partition_over_context(model, ds_config, mpu)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        mpu=mpu,
    )
    return engine


def _partition_over_context(model: nn.Module, ds_config: dict, mpu) -> None:
    """ZeRO-3 parameters partitioned over data x context, as DeepSpeed's reduction of their
    gradients needs: left to `deepspeed.initialize`, it partitions them over the mpu's
    data-parallel group alone, and then never reduces gradients over context ranks (each rank
    kept its own share of the gradient: measured at cp2). Megatron-DeepSpeed builds its model
    under the same `zero.Init` for Ulysses."""
    import deepspeed

    deepspeed.zero.Init(
        module=model,
        data_parallel_group=mpu.get_sequence_data_parallel_group(),
        config_dict_or_path=ds_config,
        mpu=mpu,
    )


def gradient_scale(engine) -> float:
    """The factor on the loss before backward that makes DeepSpeed's gradients the layout's
    mean. ZeRO-3's reduce-scatter (`__avg_scatter_grads` in DeepSpeed 0.19) divides the sum
    over data x context ranks by their number, where ZeRO 0-2 and its own all-reduce path
    divide by the data-parallel size only (the context ranks each hold part of one sequence's
    loss, so their gradients add): under context parallelism it comes out 1/cp."""
    cp = getattr(engine, "sequence_parallel_size", 1)
    return float(cp) if cp > 1 and engine.zero_optimization_stage() == 3 else 1.0
