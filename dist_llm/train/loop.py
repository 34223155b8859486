"""`dist-llm train`: the one training loop.

Runs unchanged as one process, under torchrun, and under the deepspeed launcher, on CPU (gloo)
and CUDA (NCCL): everything distributed comes from the environment (dist_llm/distributed.py).
What is trained for is an objective (pretraining and fine-tuning: next-token cross-entropy;
distillation and DPO: their own); what happens beside the steps is a hook (train/hooks.py).
"""

from __future__ import annotations

import time

from dist_llm.distributed import World, all_reduce_sum, barrier
from dist_llm.model.moe import router_loss
from dist_llm.parallel import Layout, context_chunk, model_inputs, pipeline_inputs
from dist_llm.train import failures, preemption
from dist_llm.train.engine import gradient_scale
from dist_llm.train.hooks import Hook, default_hooks
from dist_llm.train.start import preflight, resolve_precision, start
from dist_llm.train.state import Loader, Objective


def run_train(config, objective: Objective | None = None, loader: Loader | None = None) -> dict:
    """Train `config` for `objective(logits, batch)` (next-token cross-entropy when None; the
    batch it receives is already on the device; an objective that is also a Hook, such as DPO's,
    runs as one); `loader(layout)` builds the batches when they are not the shards of
    `data.sources` (DPO's pairs). Returns the run's summary."""
    started = time.monotonic()  # train.max_minutes counts from here
    signals = preemption.StopSignals.install()  # before anything slow, so an early signal counts
    config, precision = resolve_precision(config)
    preflight(config, custom_objective=objective is not None, own_data=loader is not None)
    run = start(config, objective, precision, started, loader)
    hooks = default_hooks(signals) + ([objective] if isinstance(objective, Hook) else [])
    for hook in hooks:
        hook.start(run)
    batches = iter(run.loader)
    run.engine.train()
    while not run.done:
        failures.inject(run)
        run.record(
            train_step(run.engine, run.layout, batches, run.objective, config.train.grad_accum, run.world)
        )
        for hook in hooks:
            hook.after_step(run)
    for hook in reversed(hooks):
        hook.end(run)
    barrier()
    signals.restore()
    return run.summary()


def train_step(engine, layout: Layout, batches, objective: Objective, grad_accum: int, world: World) -> float:
    """One optimizer step over `grad_accum` micro-batches; the loss averaged over the world."""
    device = world.device
    if layout.pipelined:  # DeepSpeed's 1F1B schedule pulls the micro-batches itself
        feed = ((pipeline_inputs(b, device), b["labels"].to(device)) for b in batches)
        local = engine.train_batch(feed).item()
    else:
        loss_sum = 0.0
        for _ in range(grad_accum):
            batch = context_chunk({k: v.to(device) for k, v in next(batches).items()}, layout.context)
            loss = objective(engine(batch["input_ids"], **model_inputs(batch)), batch)
            # MoE routers' load-balancing and z-losses (0 for a dense model); the reported loss
            # stays the objective's, comparable with validation.
            engine.backward((loss + router_loss(engine.module)) * gradient_scale(engine))
            engine.step()
            loss_sum += loss.item()
        local = loss_sum / grad_accum
    # Every rank holds its data-parallel group's loss (its share of it under context
    # parallelism: the group's ranks add up to it), so this is the mean over the world.
    (total,) = all_reduce_sum([local], world)
    return total * layout.cp / world.size
