"""`dist-llm train`: the one training loop.

Runs unchanged as one process, under torchrun, and under the deepspeed launcher, on CPU (gloo)
and CUDA (NCCL): everything distributed comes from the environment (dist_llm/distributed.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from dist_llm.config import Config, ConfigError
from dist_llm.data.manifest import DataError, open_split, read_manifest, read_url, resolve
from dist_llm.data.stream import eval_batches, loader_from_config
from dist_llm.distributed import World, all_reduce_sum, barrier, init_world
from dist_llm.errors import CheckpointError, TrainingDiverged
from dist_llm.model.generate import generate
from dist_llm.model.llama import Block, Llama, num_params
from dist_llm.parallel import (
    Layout,
    build_layout,
    build_model,
    checkpoint_source,
    data_parallel_size,
    init_source,
    loss_function,
)
from dist_llm.precision import Precision, format_flops, resolve_dtype
from dist_llm.train import checkpoint, failures, preemption
from dist_llm.train.engine import build_engine
from dist_llm.train.metrics import Metrics, eta, flops_per_token, memory_gb, peak_flops

SAMPLE_PROMPT = "\n"


def preflight(config: Config) -> None:
    """Checks that need the data's manifests; run before any process group starts."""
    if not config.data.sources:
        raise ConfigError("data.sources is empty: add at least one `- path: <folder written by data shard>`")
    data_parallel_size(config, int(os.environ.get("WORLD_SIZE", "1")))
    if torch.cuda.is_available():
        from dist_llm.plan.memory import fit_warning

        message = fit_warning(config, int(os.environ.get("WORLD_SIZE", "1")), torch.cuda.mem_get_info()[1])
        if message:
            warnings.warn(message, stacklevel=2)
    if config.train.dtype == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.dtype: fp16 needs CUDA (its loss scaling is GPU-only in DeepSpeed); use bf16 on CPU"
        )
    for source in config.data.sources:
        spec = open_split(source.path, "train")
        if spec.seq_len != config.data.seq_len:
            raise ConfigError(
                f"data.seq_len: {config.data.seq_len}, but {source.path} was sharded with --seq-len {spec.seq_len}"
            )
        if spec.vocab_size > config.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {config.model.vocab_size} is smaller than the tokenizer of {source.path} "
                f"({spec.vocab_size} tokens); set model.vocab_size={spec.vocab_size} or more"
            )


LossFn = Callable[[torch.Tensor, dict], torch.Tensor]


def run_train(config: Config, objective: LossFn | None = None) -> dict:
    """Train with `objective(logits, batch)`: next-token cross-entropy unless a stage such as
    distillation passes its own (the batch it receives is already on the device)."""
    started = time.monotonic()  # train.max_minutes counts from here
    stop = preemption.StopSignals.install()  # before anything slow, so an early signal counts
    config, precision = resolve_precision(config)
    preflight(config)
    if objective is not None and config.parallel.tensor * config.parallel.pipeline > 1:
        raise ConfigError(
            "parallel.tensor / parallel.pipeline: this stage's loss needs the whole vocabulary on one "
            "rank; run it with parallel.tensor=1 and parallel.pipeline=1 (ZeRO-3 shards the model)"
        )
    if config.checkpoint.resume not in ("auto", "never"):
        checkpoint.read_meta(config.checkpoint.resume)  # exists and complete, before any process group
    if config.checkpoint.init_from:
        checkpoint.saved_config(config.checkpoint.init_from)
    _check_resume(config)
    failures.watch(config.train.collective_timeout_s)  # every group, DeepSpeed's too
    world = init_world(config.train.collective_timeout_s)
    _agree_on_dtype(precision, world)
    deadline = preemption.Deadline.for_run(config.train, world, started)
    run_dir = Path(config.train.out_dir)
    resume_from = _resume_path(config)
    layout, engine = build_training(config, world, resume_from)
    if objective is None:
        loss_fn = loss_function(layout)

        def objective(logits: torch.Tensor, batch: dict) -> torch.Tensor:
            return loss_fn(logits, batch["labels"])

    loader = loader_from_config(
        config.data, config.train.micro_batch_size, dp_rank=layout.dp_rank, dp_size=layout.dp
    )
    tokenizer_dir = _stage_tokenizer(config, world, run_dir)
    metrics = Metrics(config, world, run_dir)

    step, tokens = 0, 0
    if resume_from is not None:
        step, tokens, data_state = checkpoint.resume(engine, config, world, layout, resume_from)
        if data_state is not None:
            loader.load_state_dict(data_state)
        saved = checkpoint.saved_layout(checkpoint.read_meta(resume_from))
        metrics.console(
            f"resumed from {resume_from} at step {step} (saved as tp{saved['tensor']} x pp{saved['pipeline']} "
            f"x dp{saved['data']}; data stream {'restarted' if data_state is None else 'continued exactly'})"
        )
    last_good = resume_from

    with torch.device("meta"):
        n_params = num_params(Llama(config.model))
    flops_token = flops_per_token(config.model, config.data.seq_len, n_params)
    peak, peak_source = peak_flops(config, world.device)
    metrics.console(
        f"model {n_params / 1e6:.1f}M parameters | world {world.size} = {layout.describe()} | "
        f"ZeRO-{config.parallel.zero_stage} | {config.train.dtype} ({precision.reason}) | "
        f"MFU against {format_flops(peak)} per device ({peak_source})"
    )
    if deadline.description:
        metrics.console(f"deadlines: {deadline.description}")
    val_spec = _val_split(config)
    tokens_per_step = (
        config.train.micro_batch_size * config.train.grad_accum * layout.dp * config.data.seq_len
    )
    batches = iter(loader)
    window_start, window_tokens, run_start = time.perf_counter(), 0, time.perf_counter()
    start_step = step
    val_loss = train_loss = val_step = stopped = None
    if val_spec is not None and step == 0:  # the untrained baseline, so the curve starts at the start
        val_loss = _validate(engine, config, world, layout, val_spec, metrics, step, tokenizer_dir)
        val_step = step
    engine.train()
    while step < config.train.steps:
        step_loss = train_step(engine, layout, batches, objective, config.train.grad_accum, world.device)
        step += 1
        tokens += tokens_per_step
        window_tokens += tokens_per_step
        # Every rank holds its data-parallel group's loss, so the mean over the world is the mean.
        (loss_total,) = all_reduce_sum([step_loss], world)
        train_loss = loss_total / world.size
        grad_norm = float(engine.get_global_grad_norm() or 0.0)
        # fp16's loss scaler skips steps with inf gradients by design; elsewhere they are fatal.
        diverged = not math.isfinite(train_loss) or (
            config.train.dtype != "fp16" and not math.isfinite(grad_norm)
        )
        if diverged:
            raise TrainingDiverged(
                f"loss {train_loss}, gradient norm {grad_norm} at step {step}; stopped without saving. "
                f"Last good checkpoint: {last_good or 'none'} "
                "(lower optim.lr or raise optim.warmup_steps, then resume from it)"
            )
        if step % config.logging.every == 0 or step == config.train.steps:
            elapsed = time.perf_counter() - window_start
            tok_s = window_tokens / elapsed
            mfu = tok_s * flops_token / (peak * world.size) if peak else 0.0
            lr = engine.get_lr()[0]
            mem = memory_gb(world.device)
            values = {
                "loss": train_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tok_s,
                "tokens_seen": tokens,
                "mfu": mfu,
                "memory_gb": mem,
            }
            metrics.scalars(step, values, "train")
            remaining = (config.train.steps - step) * (time.perf_counter() - run_start) / (step - start_step)
            metrics.console(
                f"step {step}/{config.train.steps} | loss {train_loss:.4f} | lr {lr:.2e} | gnorm {grad_norm:.3f} | "
                f"{tok_s:,.0f} tok/s | MFU {100 * mfu:.1f}% | mem {mem:.2f} GB | ETA {eta(remaining)}"
            )
            window_start, window_tokens = time.perf_counter(), 0
        if val_spec is not None and config.logging.val_every and step % config.logging.val_every == 0:
            val_loss = _validate(engine, config, world, layout, val_spec, metrics, step, tokenizer_dir)
            val_step = step
        if (config.checkpoint.every and step % config.checkpoint.every == 0) or step == config.train.steps:
            last_good = checkpoint.save(
                engine, config, world, layout, step, tokens, loader.state_dict(), tokenizer_dir
            )
            metrics.console(f"saved {last_good}")
        # The same answer on every rank.
        signals = stop.agreed(world, deadline) if step < config.train.steps else []
        if signals == [preemption.BUDGET]:  # the user's budget: finish here as if done
            stopped = f"train.max_minutes={config.train.max_minutes:g} reached at step {step}"
            break
        signals = [s for s in signals if s != preemption.BUDGET]
        if signals:  # saves, maybe requeues, raises errors.Preempted
            stop.stop(
                signals,
                engine,
                config,
                world,
                layout,
                step,
                tokens,
                loader,
                tokenizer_dir,
                last_good,
                metrics,
            )
    if stopped is not None:
        if last_good is None or Path(last_good).name != f"step_{step:09d}":
            last_good = checkpoint.save(
                engine, config, world, layout, step, tokens, loader.state_dict(), tokenizer_dir
            )
        metrics.console(
            f"stopped: {stopped} of {config.train.steps} after {eta(time.monotonic() - started)}; saved "
            f"{last_good}. To continue, run again with a larger train.max_minutes (or 0)"
        )
    if val_spec is not None and val_step != step:
        val_loss = _validate(engine, config, world, layout, val_spec, metrics, step, tokenizer_dir)
    _log_embeddings(engine, config, layout, metrics, step, tokenizer_dir)
    result = {"step": step, "tokens": tokens, "train_loss": train_loss, "checkpoint": str(last_good)}
    if val_loss is not None:
        result.update(val_loss=val_loss, val_perplexity=math.exp(val_loss))
    if stopped is not None:
        result["stopped"] = stopped
    metrics.hparams(
        {k: v for k, v in result.items() if isinstance(v, float)}, {"train.dtype_reason": precision.reason}
    )
    metrics.close()
    barrier()
    stop.restore()
    return result


def resolve_precision(config: Config) -> tuple[Config, Precision]:
    """The config with `train.dtype` as this run uses it (`auto` resolved for this machine)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    precision = resolve_dtype(config.train.dtype, config.parallel.zero_stage, device)
    if precision.warning and os.environ.get("RANK", "0") == "0":
        warnings.warn(precision.warning, stacklevel=2)
    train = dataclasses.replace(config.train, dtype=precision.dtype)
    return dataclasses.replace(config, train=train), precision


def _agree_on_dtype(precision: Precision, world: World) -> None:
    """Each rank measured its own CPU: all must have chosen the same format."""
    (bf16,) = all_reduce_sum([float(precision.dtype == "bf16")], world)
    if 0 < bf16 < world.size:
        raise ConfigError(
            f"train.dtype=auto chose bf16 on {int(bf16)} of {world.size} ranks (their bf16 probes "
            "disagree: mixed machines or heavy load); set train.dtype=bf16 or fp32 explicitly"
        )


def _check_resume(config: Config) -> None:
    """The checkpoint to resume must hold this model, and an exact data stream needs the
    data-parallel size it was saved with: said before the process group starts rather than
    after every rank has built its model."""
    resume_from = _resume_path(config)
    if resume_from is None:
        return
    checkpoint.check_model_matches(checkpoint.saved_config(resume_from).model, config.model, resume_from)
    if config.checkpoint.data_state != "exact":
        return
    saved = checkpoint.saved_layout(checkpoint.read_meta(resume_from))["data"]
    now = data_parallel_size(config, int(os.environ.get("WORLD_SIZE", "1")))
    if saved != now:
        raise CheckpointError(
            f"{resume_from} was saved with {saved} data-parallel ranks, this run has {now}: the data "
            "stream cannot continue exactly. Set checkpoint.data_state=restart to resume model and "
            "optimizer with the data stream started afresh (samples seen before will be seen again)"
        )


def build_training(config: Config, world: World, resume_from: Path | None) -> tuple[Layout, object]:
    """This rank's layout and DeepSpeed engine, the model's weights from the initializer, from
    checkpoint.init_from, or from the checkpoint to resume when it was saved in another layout."""
    layout = build_layout(config, world.rank, world.size)
    if resume_from is not None and checkpoint.needs_portable_resume(resume_from, layout):
        source = checkpoint_source(resume_from, config.model)
    elif config.checkpoint.init_from:
        source = checkpoint_source(config.checkpoint.init_from, config.model)
    else:  # the same initial weights in every layout (parallel/weights.py)
        source = init_source(config.model, config.train.seed)
    model = build_model(config.model, layout, source, world.device)
    prepare_blocks(model, recompute=config.train.activation_checkpointing, compile=config.train.compile)
    return layout, build_engine(model, config, world, layout)


def _resume_path(config: Config) -> Path | None:
    mode = config.checkpoint.resume
    if mode == "never":
        return None
    if mode == "auto":
        return checkpoint.latest(checkpoint.checkpoint_root(config))
    checkpoint.read_meta(mode)  # a named checkpoint must exist and be complete
    return Path(mode)


def train_step(engine, layout: Layout, batches, objective: LossFn, grad_accum: int, device) -> float:
    """One optimizer step over `grad_accum` micro-batches; this data-parallel group's mean loss."""
    if layout.pipelined:  # DeepSpeed's 1F1B schedule pulls the micro-batches itself
        feed = ((b["input_ids"].to(device), b["labels"].to(device)) for b in batches)
        return engine.train_batch(feed).item()
    loss_sum = 0.0
    for _ in range(grad_accum):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        loss = objective(engine(batch["input_ids"]), batch)
        engine.backward(loss)
        engine.step()
        loss_sum += loss.item()
    return loss_sum / grad_accum


def _blocks(model: torch.nn.Module) -> list[Block]:
    return [m for m in model.modules() if isinstance(m, Block)]


def prepare_blocks(model: torch.nn.Module, recompute: bool = False, compile: bool = False) -> None:
    """Per transformer block (in every pipeline stage too), as torchtitan does: `compile` runs
    it through torch.compile (one block's graph serves every layer), `recompute` recomputes
    its activations in the backward pass instead of storing them.

    The compiled forward goes inside the recomputation (the other way round dynamo never sees
    the block). Each block's forward is replaced on the instance rather than the block wrapped
    in another module, so parameter names (and every checkpoint and export) stay the same."""
    from torch.utils.checkpoint import checkpoint

    for block in _blocks(model):
        forward = torch.compile(block.forward) if compile else block.forward
        if recompute:
            forward = functools.partial(checkpoint, forward, use_reentrant=False)
        block.forward = forward


def _stage_tokenizer(config: Config, world: World, run_dir: Path) -> Path | None:
    """Copy the data's tokenizer into the run folder (checkpoints and samples need it)."""
    target = run_dir / "tokenizer"
    if world.is_main:
        location = config.data.sources[0].path
        manifest = read_manifest(location)
        target.mkdir(parents=True, exist_ok=True)
        for name in checkpoint.TOKENIZER_FILES:
            try:
                (target / name).write_bytes(read_url(resolve(location, name)))
            except DataError:
                if name == manifest["tokenizer"]["file"]:
                    raise
    barrier()
    return target


def _val_split(config: Config):
    if not config.logging.val_every:
        return None
    try:
        return open_split(config.data.sources[0].path, "val")
    except DataError:
        return None  # no validation shards (sharded with --val-fraction 0)


@torch.no_grad()
def _validate(
    engine, config: Config, world: World, layout: Layout, spec, metrics: Metrics, step: int, tokenizer_dir
) -> float:
    engine.eval()
    nll, count = 0.0, 0
    if layout.pipelined:  # the last stage's loss, summed over tokens while validating
        train_loss, engine.module.loss_fn = engine.module.loss_fn, loss_function(layout, "sum")
    for batch in eval_batches(
        spec,
        config.train.micro_batch_size,
        layout.dp_rank,
        layout.dp,
        config.logging.val_batches,
        config.data.verify_sha256,
    ):
        inputs, labels = batch["input_ids"].to(world.device), batch["labels"].to(world.device)
        valid = int((labels != -100).sum())
        if layout.pipelined:
            # eval_batch averages over data-parallel ranks: world sum = tp * pp * the total.
            nll += engine.eval_batch(iter([(inputs, labels)]), num_micro_batches=1).item()
        else:
            nll += loss_function(layout, "sum")(engine(inputs), labels).item()
        count += valid
    if layout.pipelined:
        engine.module.loss_fn = train_loss
    # Each data-parallel group's sums are held by all of its tp * pp ranks.
    nll, count = (x / (layout.tp * layout.pp) for x in all_reduce_sum([nll, count], world))
    loss = nll / max(count, 1)
    metrics.scalars(step, {"loss": loss, "perplexity": math.exp(min(loss, 50))}, "val")
    metrics.console(
        f"step {step} | val loss {loss:.4f} | val ppl {math.exp(min(loss, 50)):.2f} | {int(count):,} tokens"
    )
    sample = _sample_text(engine, tokenizer_dir) if layout.tp * layout.pp == 1 else None
    if sample is not None:  # sharded layouts: `dist-llm generate` on a checkpoint instead
        metrics.text(step, "samples/greedy", sample)
    engine.train()
    return loss


def _sample_text(engine, tokenizer_dir) -> str | None:
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.exists():
        return None
    tokenizer = Tokenizer.from_file(str(path))
    # Every rank generates (a ZeRO-3 model needs all ranks in each forward); rank 0 logs.
    new = generate(engine.module, tokenizer.encode(SAMPLE_PROMPT).ids, max_new_tokens=48)
    return SAMPLE_PROMPT + tokenizer.decode(new, skip_special_tokens=False)


def _log_embeddings(
    engine, config: Config, layout: Layout, metrics: Metrics, step: int, tokenizer_dir
) -> None:
    from tokenizers import Tokenizer

    weight = checkpoint.consolidated_state_dict(engine, config, layout).get(
        "tok_embeddings.weight"
    )  # collective
    path = Path(tokenizer_dir) / "tokenizer.json"
    if metrics.enabled and weight is not None and path.exists():
        tokenizer = Tokenizer.from_file(str(path))
        vocab = [tokenizer.id_to_token(i) or "" for i in range(weight.shape[0])]
        metrics.embeddings(step, weight, vocab)
