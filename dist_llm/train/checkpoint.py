"""Saving and resuming a training run, in the one checkpoint format (dist_llm/checkpoint/).

A save writes DeepSpeed's own files of this layout, every rank's RNG state, the loader's state,
Adam's moments (optimizer.safetensors) and the consolidated weights (model.safetensors). It goes
to `step_N.tmp/` and is renamed to `step_N/` only when every rank has written its part, so a
crash at any moment leaves the previous checkpoint intact and `latest` pointing at it.

Resuming in the layout that saved (tensor x pipeline x data parallel sizes) loads DeepSpeed's
own files, bit-exactly. Resuming in another layout builds the model from model.safetensors and
sets every rank's share of the fp32 master weights and Adam moments from the full tensors of
model.safetensors and optimizer.safetensors (`_resume_portable`): the same values, resharded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dist_llm.checkpoint import (
    OPTIMIZER,
    check_model_matches,
    checkpoint_root,
    load_weights,
    read_meta,
    saved_config,
    saved_layout,
    write_portable,
)
from dist_llm.config import Config
from dist_llm.distributed import World, barrier, gather_objects
from dist_llm.errors import CheckpointError
from dist_llm.files import atomic_writer, replace_dir, write_json_atomic
from dist_llm.model.roles import stored_name, untie
from dist_llm.parallel import Layout, gather_full
from dist_llm.parallel.weights import local_parameters, shard_of

ADAM_STATES = ("exp_avg", "exp_avg_sq")  # optimizer.safetensors holds "<state>/<plain name>"


def _fault(point: str) -> None:
    """Fault injection for tests: DIST_LLM_FAULT=<point>:<step> kills this process right there."""
    if os.environ.get("DIST_LLM_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- save


def save(
    engine,
    config: Config,
    world: World,
    layout: Layout,
    step: int,
    tokens: int,
    data_states: dict,
    tokenizer_dir,
) -> Path:
    root = checkpoint_root(config)
    name = f"step_{step:09d}"
    tmp = root / f"{name}.tmp"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # our own unfinished save of this step, if a run died in it
    barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{world.rank:05d}.pt")
    states = gather_objects(data_states, world)
    weights = consolidated_state_dict(engine, config, layout)
    moments = consolidated_moments(engine, config, layout)
    _fault(f"after_engine_save:{step}")
    if world.is_main:
        # One loader state per data-parallel rank, from the rank that feeds its first stage.
        write_json_atomic(tmp / "data_state.json", [states[layout.rank_of_dp(d)] for d in range(layout.dp)])
        if moments:
            save_file({k: v.contiguous() for k, v in moments.items()}, str(tmp / OPTIMIZER))
        write_portable(
            tmp,
            weights,
            config,
            tokenizer_dir,
            step=step,
            tokens=tokens,
            world_size=world.size,
            layout=layout.sizes(),
            optimizer_steps=_optimizer_steps(engine),
            scheduler=engine.lr_scheduler.state_dict(),
        )
    barrier()
    final = root / name
    if world.is_main:
        replace_dir(tmp, final)  # a step saved again: the old save goes only once the new one is in place
        with atomic_writer(root / "latest", "w") as f:
            f.write(name)
        _prune(root, config.checkpoint.keep)
    barrier()
    return final


def master_weight(param: torch.Tensor) -> torch.Tensor:
    """The fp32 master value of a parameter, whole over the data-parallel group (a collective
    under ZeRO: DeepSpeed assembles it from the ranks' partitions)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    return full if full is not None else param.detach()


def consolidated_state_dict(engine, config: Config, layout: Layout) -> dict[str, torch.Tensor]:
    """The plain model's full fp32 weights on rank 0, {} elsewhere (a collective: all ranks must
    call it), whatever the layout: ZeRO partitions, tensor-parallel shards and stages joined."""
    return gather_full(engine.module, config.model, layout, master_weight)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(int(x) for x in state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------- resume


def resume(engine, config: Config, world: World, layout: Layout, path: Path) -> tuple[int, int, dict | None]:
    """Restore model, optimizer, scheduler, RNG and data state; return (step, tokens, data state).

    The engine's model must have been built from this checkpoint's weights when the layout
    changed (`needs_portable_resume`)."""
    meta = read_meta(path)
    check_model_matches(saved_config(path).model, config.model, path)
    if not meta.get("resumable", True):
        raise CheckpointError(
            f"{path} holds weights only (no optimizer state): start from it with checkpoint.init_from"
        )
    if needs_portable_resume(path, layout):
        _resume_portable(engine, config, layout, path, meta)
    else:
        loaded, _ = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {path}: its DeepSpeed files are missing")
        _restore_rng(torch.load(path / "rng" / f"rank_{world.rank:05d}.pt", weights_only=True))
    states = json.loads((path / "data_state.json").read_text())
    if config.checkpoint.data_state == "restart":
        return meta["step"], meta["tokens"], None
    if len(states) != layout.dp:
        raise CheckpointError(
            f"{path} holds the data positions of {len(states)} data-parallel ranks, this run has {layout.dp} "
            f"({layout.describe()}); the stream cannot continue exactly. Set checkpoint.data_state=restart "
            "to continue with the data stream started afresh (samples seen before will be seen again)"
        )
    return meta["step"], meta["tokens"], states[layout.dp_rank]


def needs_portable_resume(path: str | Path, layout: Layout) -> bool:
    """True when `path` was saved in another (tensor, pipeline, data) layout."""
    return saved_layout(read_meta(path)) != layout.sizes()


def _resume_portable(engine, config: Config, layout: Layout, path: Path, meta: dict) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if config.train.dtype == "fp16":
        raise CheckpointError(
            f"{path}: fp16 runs keep a loss scale in DeepSpeed's files; resume fp16 in the layout that "
            f"saved it ({saved_layout(meta)})"
        )
    if not (path / OPTIMIZER).exists():
        raise CheckpointError(f"{path} has no {OPTIMIZER}: resume it in its own layout {saved_layout(meta)}")
    moments = load_file(str(path / OPTIMIZER))
    weights = load_weights(path, config.model)
    _create_optimizer_state(engine, meta["optimizer_steps"])
    for name, param in local_parameters(engine.module, layout.pipelined):
        safe_set_full_fp32_param(param, shard_of(weights[name], param, layout.tensor).to(param.device))
        for key in ADAM_STATES:
            full = moments[f"{key}/{stored_name(name, config.model)}"]
            safe_set_full_optimizer_state(param, shard_of(full, param, layout.tensor).to(param.device), key)
    engine.lr_scheduler.load_state_dict(meta["scheduler"])
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    engine.global_steps = meta["step"]
    engine.global_samples = meta["step"] * engine.train_batch_size()


def _base_optimizer(engine):
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _optimizer_steps(engine) -> int:
    states = [s for s in _base_optimizer(engine).state.values() if "step" in s]
    return int(states[0]["step"]) if states else 0


def _flat_master_partitions(engine) -> list[torch.Tensor]:
    # The fp32 tensors DeepSpeed's optimizer wrappers hand to torch's AdamW, by ZeRO stage.
    for attr in (
        "single_partition_of_fp32_groups",
        "fp32_partitioned_groups_flat",
        "fp32_groups_flat_partition",
    ):
        if hasattr(engine.optimizer, attr):
            return list(getattr(engine.optimizer, attr))
    raise CheckpointError(
        f"resuming in a new layout needs ZeRO >= 1 (got an optimizer {type(engine.optimizer).__name__}); "
        "set parallel.zero_stage=1 or resume in the layout that saved the checkpoint"
    )


def _create_optimizer_state(engine, steps: int) -> None:
    """AdamW creates its state at the first step; create it now so it can be filled."""
    base = _base_optimizer(engine)
    for flat in _flat_master_partitions(engine):
        base.state[flat] = {
            "step": torch.tensor(float(steps)),
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    _link_optimizer_state(engine)


def _link_optimizer_state(engine) -> None:
    """Point each parameter's DeepSpeed fragment at the Adam moments of its flat partition.

    DeepSpeed 0.19.8 links them once, right after the first group's first optimizer step,
    when the other param groups (our no-decay group) have no state yet, and never again: their
    moments then read as missing. Linking again once every group has state repairs that."""
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def consolidated_moments(engine, config: Config, layout: Layout) -> dict[str, torch.Tensor]:
    """Adam's full fp32 moments as {"exp_avg/<plain name>": tensor, ...} (a collective), whatever
    the layout. Empty under ZeRO-0, which keeps no fp32 master partitions (its checkpoints
    resume in their own layout only)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if engine.zero_optimization_stage() == 0:
        return {}
    _link_optimizer_state(engine)
    out = {}
    for key in ADAM_STATES:
        full = gather_full(
            engine.module, config.model, layout, lambda p, key=key: safe_get_full_optimizer_state(p, key)
        )
        out.update({f"{key}/{name}": tensor for name, tensor in untie(full, config.model).items()})
    return out
