"""Saving and resuming a training run, in the one checkpoint format (dist_llm/checkpoint/).

A save writes, from every rank in parallel, only what that rank owns (`local_shards`): its
piece of the fp32 master weights and of both Adam moments, as rectangles of the plain model's
full tensors, into `shards/` (checkpoint/sharded.py, on torch.distributed.checkpoint). A
tensor-parallel slice, a pipeline stage's layers and a ZeRO partition of the slice are all
just pieces; a piece several ranks hold (a replicated norm weight, ZeRO-0's unpartitioned
state) is written once. No rank gathers anything but the loaders' small states.

With `checkpoint.async_save` the pieces are copied to host memory, the loop goes on, and a
background thread writes them (over a process group of its own). Either way the save goes to
`step_N.tmp/` and is renamed to `step_N/` only once every rank's shard and dist_llm.json
(listing every file) are written, so a crash at any moment leaves the previous checkpoint
intact and `latest` pointing at it.

Resuming reads, on each rank, the rectangles its own pieces are in the run's layout, from
whatever pieces the saving layout wrote: any tensor, pipeline and data parallel sizes and ZeRO
stage. The same layout continues bit-exactly (RNG states restored too).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from dist_llm.checkpoint import (
    SHARDS,
    check_model_matches,
    checkpoint_root,
    is_sharded,
    read_meta,
    saved_config,
    saved_layout,
    sharded,
    write_meta,
)
from dist_llm.checkpoint.convert import advice as convert_advice
from dist_llm.config import Config
from dist_llm.distributed import World, barrier, gather_objects
from dist_llm.errors import CheckpointError
from dist_llm.files import atomic_writer, replace_dir, write_json_atomic
from dist_llm.model.llama import Llama
from dist_llm.model.roles import EMBEDDING_WEIGHT, stored_name
from dist_llm.parallel import Layout, gather_full
from dist_llm.parallel.weights import full_pieces, local_parameters
from dist_llm.train.lora import ADAPTER, is_lora, trained_parameters, write_adapter

ADAM_STATES = ("exp_avg", "exp_avg_sq")
STATES = ("model", *ADAM_STATES)  # the shards hold "<state>/<plain name>": fp32 masters, moments


def _fault(point: str) -> None:
    """Fault injection for tests: DIST_LLM_FAULT=<point>:<step> kills this process right there."""
    if os.environ.get("DIST_LLM_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- what a rank owns


@dataclasses.dataclass
class _Fragment:
    """The elements [start, start + numel) of a parameter's (tensor-parallel) slice, flattened,
    that this rank's optimizer holds: 1-d views of its fp32 master and moments."""

    start: int
    numel: int
    values: dict[str, torch.Tensor]
    commit: object = None  # ZeRO-3 (possibly offloaded): writes the values back after a load


def _fragment(engine, param) -> _Fragment | None:
    if hasattr(param, "ds_id"):  # ZeRO-3 partitions each parameter on its own
        from deepspeed.utils import (
            safe_get_local_fp32_param,
            safe_get_local_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        size = param.ds_tensor.ds_numel
        start = size * dist.get_rank(group=param.ds_process_group)
        numel = max(0, min(size, param.ds_numel - start))
        full = {"model": safe_get_local_fp32_param(param)}
        full.update({k: safe_get_local_optimizer_state(param, k) for k in ADAM_STATES})

        def commit():
            safe_set_local_fp32_param(param, full["model"])
            for k in ADAM_STATES:
                safe_set_local_optimizer_state(param, full[k], k)

        return _Fragment(start, numel, {k: v.view(-1)[:numel] for k, v in full.items()}, commit)
    if hasattr(param, "_hp_mapping"):  # ZeRO 1/2 and DeepSpeed's bf16 optimizer
        mapping = param._hp_mapping
        if mapping is None:
            return None  # this rank's partition holds none of it
        values = {"model": mapping.hp_fragment}
        values.update({k: mapping.get_optim_state_fragment(k) for k in ADAM_STATES})
        address = mapping.lp_fragment_address
        return _Fragment(address.start, address.numel, values)
    # ZeRO-0: the slice itself, replicated over data parallel (DCP writes it once)
    state = _base_optimizer(engine).state[param]
    values = {"model": param.data.view(-1), **{k: state[k].view(-1) for k in ADAM_STATES}}
    return _Fragment(0, param.numel(), values)


def _full_shapes(config: Config, engine) -> dict[str, tuple[int, ...]]:
    if is_lora(engine.module):  # whole on every rank (no tensor parallelism with LoRA)
        return {k: tuple(getattr(p, "ds_shape", p.shape)) for k, p in trained_parameters(engine.module)}
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in Llama(config.model).named_parameters()}


def _trained(engine, config: Config, layout: Layout):
    """(stored name, parameter) of what the optimizer trains on this rank: the plain model's
    parameters, or a LoRA run's adapters (its base is frozen and rebuilt from init_from)."""
    if is_lora(engine.module):
        yield from trained_parameters(engine.module)
        return
    for name, param in local_parameters(engine.module, layout.pipelined):
        yield stored_name(name, config.model), param


def _owned(engine, config: Config, layout: Layout):
    """(stored name, parameter, fragment) of everything this rank saves and restores. A tied
    embedding is in the first and the last pipeline stage: the first one's is the one."""
    for key, param in _trained(engine, config, layout):
        if (
            layout.pipelined
            and not layout.is_first_stage
            and config.model.tie_embeddings
            and key == EMBEDDING_WEIGHT
        ):
            continue
        fragment = _fragment(engine, param)
        if fragment is not None:
            yield key, param, fragment


def local_shards(
    engine, config: Config, layout: Layout, copy: bool = False, staging: dict | None = None
) -> sharded.Shards:
    """This rank's pieces of every full tensor, {"<state>/<name>": Sharded}: views of the live
    optimizer state, or host copies of them with `copy` (for a save in the background), into
    the buffers of `staging` when given (kept between saves: the second copy into memory
    already touched is several times faster than into fresh pages)."""
    _link_optimizer_state(engine)
    shapes, out = _full_shapes(config, engine), {}
    for key, param, fragment in _owned(engine, config, layout):
        for offsets, sizes, lo, hi in full_pieces(
            param, layout.tensor, shapes[key], fragment.start, fragment.numel
        ):
            for state in STATES:
                value = fragment.values[state][lo:hi].view(sizes).detach()
                value = _host_copy(value, staging, (state, key, offsets)) if copy else value.cpu()
                out.setdefault(f"{state}/{key}", sharded.Sharded(shapes[key], [])).pieces.append(
                    sharded.Piece(offsets, value)
                )
    if copy and torch.cuda.is_available():
        torch.cuda.synchronize()  # the copies into pinned memory were queued, not done
    return out


def _host_copy(t: torch.Tensor, staging: dict | None, key) -> torch.Tensor:
    out = staging.get(key) if staging is not None else None
    if out is None or out.shape != t.shape or out.dtype != t.dtype:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
        if staging is not None:
            staging[key] = out
    out.copy_(t, non_blocking=t.is_cuda)
    return out


# ---------------------------------------------------------------- save


class Saver:
    """Writes checkpoints, one at a time: in the caller's thread, or (async) in a background
    thread once the state is staged in host memory. `blocked` is how long the last save held
    the loop; `complete` is the newest checkpoint known to be complete."""

    def __init__(self, config: Config, world: World, layout: Layout):
        self.config, self.world, self.layout = config, world, layout
        self.asynchronous = config.checkpoint.async_save
        # Collectives of a background save must not interleave with the loop's: their own group.
        self.group = dist.new_group(backend="gloo") if self.asynchronous and dist.is_initialized() else None
        self.pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if self.asynchronous else None
        )
        self.pending: Future | None = None
        # Host buffers of an async save, reused by the next one (written only once it is done).
        self.staging: dict = {}
        self.complete: Path | None = None
        self.blocked = 0.0

    def save(self, engine, step: int, tokens: int, data_states: dict, tokenizer_dir) -> Path:
        """Checkpoint `step` (a collective); returns its final path (written by then unless async)."""
        began = time.perf_counter()
        self.wait()
        root = checkpoint_root(self.config)
        name = f"step_{step:09d}"
        tmp = root / f"{name}.tmp"
        if self.world.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(
                tmp, ignore_errors=True
            )  # our own unfinished save of this step, if a run died in it
        barrier()
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank_{self.world.rank:05d}.pt")
        states = gather_objects(data_states, self.world)
        meta = {
            "step": step,
            "tokens": tokens,
            "world_size": self.world.size,
            "layout": self.layout.sizes(),
            "optimizer_steps": _optimizer_steps(engine),
            "scheduler": engine.lr_scheduler.state_dict(),
            "loss_scaler": _loss_scaler(engine),
        }
        shards = local_shards(engine, self.config, self.layout, copy=self.asynchronous, staging=self.staging)
        if is_lora(engine.module):  # peft's own files beside the shards (small: gathered on rank 0)
            adapters = {
                k: master_weight(p).detach().cpu().clone() for k, p in trained_parameters(engine.module)
            }
            if self.world.is_main:
                write_adapter(tmp / ADAPTER, adapters, self.config.lora, self.config.checkpoint.init_from)
        job = (tmp, root / name, shards, states, meta, tokenizer_dir)
        if self.asynchronous:
            self.pending = self.pool.submit(self._write, *job)
        else:
            self._write(*job)
        self.blocked = time.perf_counter() - began
        return root / name

    def wait(self) -> Path | None:
        """Until the save in flight (if any) is complete; re-raises its error."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()
        return self.complete

    def _write(self, tmp: Path, final: Path, shards, states, meta, tokenizer_dir) -> None:
        try:
            sharded.save(tmp / SHARDS, shards, self.group)  # returns on every rank once all are written
        except CheckpointError as exc:
            raise CheckpointError(
                f"saving step {meta['step']} failed: {exc}. Nothing was replaced: the newest complete "
                f"checkpoint is still {self.complete or 'the one before this run'} (`latest` names it); "
                "free disk space or fix the folder's permissions (train.out_dir), then resume"
            ) from None
        _fault(f"after_engine_save:{meta['step']}")
        if self.world.is_main:
            # One loader state per data-parallel rank, from the rank that feeds its first stage.
            layout = self.layout
            write_json_atomic(
                tmp / "data_state.json", [states[layout.rank_of_dp(d)] for d in range(layout.dp)]
            )
            write_meta(tmp, self.config, tokenizer_dir, **meta)
            replace_dir(tmp, final)  # a step saved again: the old save goes only once the new one is in place
            with atomic_writer(final.parent / "latest", "w") as f:
                f.write(final.name)
            _prune(final.parent, self.config.checkpoint.keep)
        self._done_barrier()
        self.complete = final

    def _done_barrier(self) -> None:
        # Every rank returns once rank 0 has renamed: `complete` is true everywhere.
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier(group=self.group)

    def close(self) -> None:
        self.wait()
        if self.pool is not None:
            self.pool.shutdown()


def master_weight(param: torch.Tensor) -> torch.Tensor:
    """The fp32 master value of a parameter, whole over the data-parallel group (a collective
    under ZeRO: DeepSpeed assembles it from the ranks' partitions)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    return full if full is not None else param.detach()


def consolidated_state_dict(
    engine, config: Config, layout: Layout, only: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """The plain model's full fp32 weights (or those named in `only`) on rank 0, {} elsewhere
    (a collective), assembled by DeepSpeed's own API: the independent reference the tests hold
    the shards to. Never part of a save: rank 0 would hold the whole model."""
    return gather_full(engine.module, config.model, layout, master_weight, only)


def consolidated_moments(engine, config: Config, layout: Layout) -> dict[str, torch.Tensor]:
    """Adam's full moments as {"exp_avg/<plain name>": tensor, ...} on rank 0 (a collective, by
    DeepSpeed's API, for tests); empty under ZeRO-0."""
    from deepspeed.utils import safe_get_full_optimizer_state

    from dist_llm.model.roles import untie

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
    """Keep the `keep` newest complete checkpoints (the one just written is the newest)."""
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old)


def _loss_scaler(engine) -> dict | None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None or not hasattr(scaler, "cur_scale"):
        return None
    keys = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
    return {k: float(getattr(scaler, k)) for k in keys if hasattr(scaler, k)}


# ---------------------------------------------------------------- resume


def check_resumable(path: Path, config: Config) -> dict:
    """A training checkpoint of this model, in the sharded format (before any process group
    starts, and again in `resume`); returns its metadata."""
    meta = read_meta(path, verify=False)  # verified where it was chosen (train/start.py: resume_path)
    saved = saved_config(path)
    check_model_matches(saved.model, config.model, path)
    if (saved.lora.rank, saved.lora.alpha, sorted(saved.lora.target)) != (
        config.lora.rank,
        config.lora.alpha,
        sorted(config.lora.target),
    ):
        raise CheckpointError(
            f"{path} was saved with lora rank={saved.lora.rank} alpha={saved.lora.alpha} target={saved.lora.target}, "
            f"this run has rank={config.lora.rank} alpha={config.lora.alpha} target={config.lora.target}: a resume "
            "continues the same adapters; set the lora section to the checkpoint's, or start a new run "
            "(checkpoint.resume=never, another train.out_dir)"
        )
    if not meta.get("resumable", True):
        raise CheckpointError(
            f"{path} holds weights only (no optimizer state): start from it with checkpoint.init_from"
        )
    if not is_sharded(path):
        raise CheckpointError(
            f"{path} was written by dist-llm before sharded checkpoints (model.safetensors + DeepSpeed's files); "
            + convert_advice(path)
        )
    return meta


def resume(engine, config: Config, world: World, layout: Layout, path: Path) -> tuple[int, int, dict | None]:
    """Restore model, optimizer, scheduler, RNG and data state; return (step, tokens, data state).

    The engine's model must have been built from this checkpoint's weights
    (`parallel.checkpoint_source`): each rank reads its own slices of them."""
    meta = check_resumable(path, config)
    _restore(engine, config, layout, path, meta)
    same_layout = saved_layout(meta) == layout.sizes()
    if same_layout:
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


def _restore(engine, config: Config, layout: Layout, path: Path, meta: dict) -> None:
    """Every rank reads its fragments of the fp32 masters and Adam moments straight into
    DeepSpeed's buffers, then the scheduler, step counters and loss scale."""
    _create_optimizer_state(engine, meta["optimizer_steps"])
    shapes, wanted, commits = _full_shapes(config, engine), {}, []
    for key, param, fragment in _owned_for_load(engine, config, layout):
        for offsets, sizes, lo, hi in full_pieces(
            param, layout.tensor, shapes[key], fragment.start, fragment.numel
        ):
            for state in STATES:
                dest = fragment.values[state][lo:hi].view(sizes)
                wanted.setdefault(f"{state}/{key}", sharded.Sharded(shapes[key], [])).pieces.append(
                    sharded.Piece(offsets, dest)
                )
        if fragment.commit is not None:
            commits.append(fragment.commit)
    sharded.load(path / SHARDS, wanted)
    for commit in commits:
        commit()
    engine.lr_scheduler.load_state_dict(meta["scheduler"])
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    engine.global_steps = meta["step"]
    engine.global_samples = meta["step"] * engine.train_batch_size()
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for k, v in (meta.get("loss_scaler") or {}).items():
        setattr(scaler, k, type(getattr(scaler, k))(v))


def _owned_for_load(engine, config: Config, layout: Layout):
    """Like `_owned`, but every stage holding a tied embedding restores its own copy."""
    for key, param in _trained(engine, config, layout):
        fragment = _fragment(engine, param)
        if fragment is not None:
            yield key, param, fragment


def _base_optimizer(engine):
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _optimizer_steps(engine) -> int:
    states = [s for s in _base_optimizer(engine).state.values() if "step" in s]
    return int(states[0]["step"]) if states else 0


def _flat_master_partitions(engine) -> list[torch.Tensor]:
    """The fp32 tensors DeepSpeed's optimizer wrappers hand to torch's AdamW (by ZeRO stage);
    ZeRO-0 hands it the parameters themselves."""
    for attr in (
        "single_partition_of_fp32_groups",
        "fp32_partitioned_groups_flat",
        "fp32_groups_flat_partition",
    ):
        if hasattr(engine.optimizer, attr):
            return list(getattr(engine.optimizer, attr))
    return [p for group in _base_optimizer(engine).param_groups for p in group["params"]]


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
