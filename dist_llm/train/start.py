"""Everything a training run does before its first step: checks that need no process group
(so that a mistake costs seconds, not a cluster allocation), then the process group, the
model in its layout, the DeepSpeed engine, the data loader and the resume."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import warnings
from pathlib import Path

import torch

from dist_llm import checkpoint
from dist_llm.config import Config, ConfigError
from dist_llm.data.manifest import DataError, open_split, read_manifest, read_url, resolve
from dist_llm.data.stream import loader_from_config
from dist_llm.distributed import World, all_reduce_sum, barrier, init_world
from dist_llm.errors import CheckpointError
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
from dist_llm.precision import Precision, resolve_dtype
from dist_llm.train import failures
from dist_llm.train.checkpoint import Saver, check_resumable, resume
from dist_llm.train.engine import build_engine
from dist_llm.train.lora import ADAPTER, apply_lora, load_adapter, read_adapter
from dist_llm.train.metrics import Metrics
from dist_llm.train.state import Loader, Objective, Run

# ---------------------------------------------------------------- before the process group


def resolve_precision(config: Config) -> tuple[Config, Precision]:
    """The config with `train.dtype` as this run uses it (`auto` resolved for this machine)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    precision = resolve_dtype(config.train.dtype, config.parallel.zero_stage, device)
    if precision.warning and os.environ.get("RANK", "0") == "0":
        warnings.warn(precision.warning, stacklevel=2)
    train = dataclasses.replace(config.train, dtype=precision.dtype)
    return dataclasses.replace(config, train=train), precision


def preflight(config: Config, custom_objective: bool = False, own_data: bool = False) -> None:
    """Checks that need the data's manifests and the checkpoints; run before any process group
    (`own_data`: the stage brings its own batches, data.sources may be empty)."""
    if config.lora.rank:
        _check_peft()
    if not config.data.sources and not own_data:
        raise ConfigError("data.sources is empty: add at least one `- path: <folder written by data shard>`")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    data_parallel_size(config, world_size)
    if torch.cuda.is_available():
        from dist_llm.plan.memory import fit_warning

        message = fit_warning(config, world_size, torch.cuda.mem_get_info()[1])
        if message:
            warnings.warn(message, stacklevel=2)
    if config.train.dtype == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.dtype: fp16 needs CUDA (its loss scaling is GPU-only in DeepSpeed); use bf16 on CPU"
        )
    if custom_objective and config.parallel.tensor * config.parallel.pipeline > 1:
        raise ConfigError(
            "parallel.tensor / parallel.pipeline: this stage's loss needs the whole vocabulary on one "
            "rank; run it with parallel.tensor=1 and parallel.pipeline=1 (ZeRO-3 shards the model)"
        )
    if custom_objective and config.parallel.context > 1:
        raise ConfigError(
            "parallel.context: this stage's loss needs whole sequences on one rank; run it with parallel.context=1"
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
    if config.checkpoint.init_from:
        saved = checkpoint.saved_config(config.checkpoint.init_from).model
        checkpoint.check_model_matches(saved, config.model, config.checkpoint.init_from, weights_only=True)
    _check_resume(config)
    _check_out_dir(config)


def _check_peft() -> None:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ConfigError("lora.rank: LoRA needs peft: pip install 'dist-llm[tune]' (or set lora.rank=0)")


# The shards: fp32 master weights and both Adam moments, each element once (train/checkpoint.py).
CHECKPOINT_BYTES_PER_PARAM = 12


def _check_out_dir(config: Config) -> None:
    """train.out_dir must be (or be creatable as) a writable folder; warn when its file system
    cannot hold the checkpoints this run keeps (plus the one being written)."""
    out = Path(config.train.out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.out_dir: {out} exists and is not a folder; choose another path")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"train.out_dir: {out} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"train.out_dir: {out} cannot be created: {existing} is not writable")
    with torch.device("meta"):
        n_params = num_params(Llama(config.model))
    need = (config.checkpoint.keep + 1) * n_params * CHECKPOINT_BYTES_PER_PARAM
    free = shutil.disk_usage(existing).free
    if free < need and os.environ.get("RANK", "0") == "0":
        warnings.warn(
            f"train.out_dir: {existing} has {free / 1e9:.1f} GB free; {config.checkpoint.keep + 1} checkpoints "
            f"of this model (checkpoint.keep + the one being written) need about {need / 1e9:.1f} GB",
            stacklevel=2,
        )


def resume_path(config: Config, report: bool = False) -> Path | None:
    """The checkpoint to resume (`auto`: the newest intact one; `report` warns, on rank 0, about
    each newer one that is damaged and was passed over)."""
    mode = config.checkpoint.resume
    if mode == "never":
        return None
    if mode == "auto":
        path, skipped = checkpoint.newest_intact(checkpoint.checkpoint_root(config))
        if report and skipped and os.environ.get("RANK", "0") == "0":
            reasons = "\n  ".join(skipped)
            warnings.warn(
                f"checkpoint.resume=auto: resuming from {path}, passing over:\n  {reasons}", stacklevel=2
            )
        return path
    checkpoint.read_meta(mode)  # a named checkpoint must exist, be complete and intact
    return Path(mode)


def _check_resume(config: Config) -> None:
    """The checkpoint to resume must hold this model, and an exact data stream needs the
    data-parallel size it was saved with: said before the process group starts rather than
    after every rank has built its model."""
    resume_from = resume_path(config, report=True)
    if resume_from is None:
        return
    check_resumable(resume_from, config)
    if config.checkpoint.data_state != "exact":
        return
    saved = checkpoint.saved_layout(checkpoint.read_meta(resume_from, verify=False))["data"]
    now = data_parallel_size(config, int(os.environ.get("WORLD_SIZE", "1")))
    if saved != now:
        raise CheckpointError(
            f"{resume_from} was saved with {saved} data-parallel ranks, this run has {now}: the data "
            "stream cannot continue exactly. Set checkpoint.data_state=restart to resume model and "
            "optimizer with the data stream started afresh (samples seen before will be seen again)"
        )


# ---------------------------------------------------------------- the run


def start(
    config: Config,
    objective: Objective | None,
    precision: Precision,
    started: float,
    loader: Loader | None = None,
) -> Run:
    """Join the process group and build this rank's part of the run, resumed when asked."""
    failures.watch(config.train.collective_timeout_s)  # every group, DeepSpeed's too
    world = init_world(config.train.collective_timeout_s)
    _agree_on_dtype(precision, world)
    resume_from = resume_path(config)
    layout, engine = build_training(config, world, resume_from)
    if loader is not None:
        loader = loader(layout)
    else:
        loader = loader_from_config(
            config.data, config.train.micro_batch_size, dp_rank=layout.dp_rank, dp_size=layout.dp
        )
    run_dir = Path(config.train.out_dir)
    run = Run(
        config=config,
        world=world,
        layout=layout,
        engine=engine,
        loader=loader,
        metrics=Metrics(config, world, run_dir),
        objective=objective or lm_objective(layout),
        precision=precision,
        tokenizer_dir=_stage_tokenizer(config, world, run_dir),
        started=started,
        saver=Saver(config, world, layout),
    )
    if resume_from is not None:
        _resume(run, resume_from)
    failures.track(run)  # a crash from here on names the step and the checkpoint to resume
    return run


def lm_objective(layout: Layout) -> Objective:
    """Next-token cross-entropy over the labels (-100 = not scored: prompts, padding), with the
    vocabulary split over the tensor-parallel group where it is."""
    loss_fn = loss_function(layout)
    return lambda logits, batch: loss_fn(logits, batch["labels"])


def build_training(config: Config, world: World, resume_from: Path | None) -> tuple[Layout, object]:
    """This rank's layout and DeepSpeed engine, the model's weights from the initializer, from
    checkpoint.init_from, or from the checkpoint to resume when it was saved in another layout."""
    layout = build_layout(config, world.rank, world.size)
    lora = config.lora.rank > 0
    if resume_from is not None and not lora:  # each rank reads its own slices of the checkpoint's weights
        source = checkpoint_source(resume_from, config.model)
    elif config.checkpoint.init_from:
        source = checkpoint_source(config.checkpoint.init_from, config.model)
    else:  # the same initial weights in every layout (parallel/weights.py)
        source = init_source(config.model, config.train.seed)
    model = build_model(config.model, layout, source, world.device)
    prepare_blocks(model, recompute=config.train.activation_checkpointing, compile=config.train.compile)
    if lora:  # the base from init_from (a LoRA checkpoint holds adapters only)
        model = apply_lora(model, config.lora)
        if resume_from is not None:  # the adapters' weights too, as the plain model's come from `source`
            load_adapter(model, read_adapter(resume_from / ADAPTER)[1])
    return layout, build_engine(model, config, world, layout)


def prepare_blocks(model: torch.nn.Module, recompute: bool = False, compile: bool = False) -> None:
    """Per transformer block (in every pipeline stage too), as torchtitan does: `compile` runs
    it through torch.compile (one block's graph serves every layer), `recompute` recomputes
    its activations in the backward pass instead of storing them.

    The compiled forward goes inside the recomputation (the other way round dynamo never sees
    the block). Each block's forward is replaced on the instance rather than the block wrapped
    in another module, so parameter names (and every checkpoint and export) stay the same."""
    from torch.utils.checkpoint import checkpoint as recomputed

    for block in (m for m in model.modules() if isinstance(m, Block)):
        forward = torch.compile(block.forward) if compile else block.forward
        if recompute:
            forward = functools.partial(recomputed, forward, use_reentrant=False)
        block.forward = forward


def _agree_on_dtype(precision: Precision, world: World) -> None:
    """Each rank measured its own CPU: all must have chosen the same format."""
    (bf16,) = all_reduce_sum([float(precision.dtype == "bf16")], world)
    if 0 < bf16 < world.size:
        raise ConfigError(
            f"train.dtype=auto chose bf16 on {int(bf16)} of {world.size} ranks (their bf16 probes "
            "disagree: mixed machines or heavy load); set train.dtype=bf16 or fp32 explicitly"
        )


def _resume(run: Run, path: Path) -> None:
    run.step, run.tokens, data_state = resume(run.engine, run.config, run.world, run.layout, path)
    run.first_step, run.last_good = run.step, path
    run.saver.complete = path
    if data_state is not None:
        run.loader.load_state_dict(data_state)
    saved = checkpoint.saved_layout(checkpoint.read_meta(path, verify=False))
    context = f" x cp{saved['context']}" if saved.get("context", 1) > 1 else ""
    run.metrics.console(
        f"resumed from {path} at step {run.step} (saved as tp{saved['tensor']} x pp{saved['pipeline']}{context} "
        f"x dp{saved['data']}; data stream {'restarted' if data_state is None else 'continued exactly'})"
    )


def _stage_tokenizer(config: Config, world: World, run_dir: Path) -> Path | None:
    """Copy the data's tokenizer into the run folder (checkpoints and samples need it)."""
    target = run_dir / "tokenizer"
    if world.is_main and not config.data.sources:  # batches of the stage's own: the init checkpoint's
        target.mkdir(parents=True, exist_ok=True)
        for name in checkpoint.TOKENIZER_FILES:
            if (Path(config.checkpoint.init_from or ".") / name).is_file():
                shutil.copyfile(Path(config.checkpoint.init_from) / name, target / name)
    elif world.is_main:
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
