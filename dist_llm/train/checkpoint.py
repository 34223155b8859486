"""One checkpoint format for every stage, written atomically.

```
<out_dir>/checkpoints/
  latest                  name of the newest complete checkpoint (replaced atomically)
  step_000300/
    dist_llm.json         step, tokens seen, the resolved config; written last = complete
    model.safetensors     consolidated fp32 weights (what eval, generate and export read)
    data_state.json       the data loader's state of every data-parallel rank
    rng/rank_00000.pt     RNG states per rank (tensors only: loads with weights_only=True)
    tokenizer.json ...    the tokenizer the data was made with
    mp_rank_00_model_states.pt, *optim_states.pt    DeepSpeed's own files (model, optimizer,
                          scheduler), for exact resume
```

A save goes to `step_N.tmp/` and is renamed to `step_N/` only when every rank has written its
part, so a crash at any moment leaves the previous checkpoint intact and `latest` pointing at it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dist_llm.config import Config, ConfigError, ModelConfig, config_from_dict, config_to_dict
from dist_llm.distributed import World, barrier, gather_objects
from dist_llm.errors import CheckpointError
from dist_llm.files import atomic_writer, write_json_atomic

FORMAT = "dist-llm-checkpoint"
VERSION = 1
META = "dist_llm.json"
WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def checkpoint_root(config: Config) -> Path:
    return Path(config.train.out_dir) / "checkpoints"


def _fault(point: str) -> None:
    """Fault injection for tests: DIST_LLM_FAULT=<point>:<step> kills this process right there."""
    if os.environ.get("DIST_LLM_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- save


def save(
    engine, config: Config, world: World, step: int, tokens: int, data_states: dict, tokenizer_dir
) -> Path:
    root = checkpoint_root(config)
    name = f"step_{step:09d}"
    tmp = root / f"{name}.tmp"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{world.rank:05d}.pt")
    states = gather_objects(data_states, world)
    weights = consolidated_state_dict(engine)
    _fault(f"after_engine_save:{step}")
    if world.is_main:
        write_json_atomic(tmp / "data_state.json", states)
        _write_portable(tmp, weights, config, tokenizer_dir, step=step, tokens=tokens, world_size=world.size)
    barrier()
    final = root / name
    if world.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        with atomic_writer(root / "latest", "w") as f:
            f.write(name)
        _prune(root, config.checkpoint.keep)
    barrier()
    return final


def _write_portable(folder: Path, weights: dict, config: Config, tokenizer_dir, **meta) -> None:
    """What every checkpoint holds: safetensors weights, the tokenizer, and dist_llm.json last."""
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    save_file(_untie(tensors, config.model), str(folder / WEIGHTS))
    for file in TOKENIZER_FILES:
        if tokenizer_dir is not None and (Path(tokenizer_dir) / file).exists():
            shutil.copyfile(Path(tokenizer_dir) / file, folder / file)
    write_json_atomic(
        folder / META, {"format": FORMAT, "version": VERSION, **meta, "config": config_to_dict(config)}
    )


def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights on every rank (a collective: all ranks must call it).

    Under ZeRO the fp32 master copy is partitioned and the module may hold bf16 copies;
    DeepSpeed's safe_get_full_fp32_param assembles the master value of each parameter.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        out[name] = (full if full is not None else param.detach()).float().cpu().clone()
    return out


def _untie(weights: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    weights = dict(weights)
    if model.tie_embeddings:
        weights.pop("output.weight", None)  # safetensors refuses shared storage; re-tied on load
    return weights


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


# ---------------------------------------------------------------- find and check


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    pointer = root / "latest"
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if (path / META).exists():
            return path
    complete = sorted(p for p in root.glob("step_*") if (p / META).exists() and not p.name.endswith(".tmp"))
    return complete[-1] if complete else None


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.name.endswith(".tmp"):
        raise CheckpointError(
            f"{path} is an unfinished save (the run died while writing it); use the one before"
        )
    meta_file = path / META
    if not meta_file.exists():
        found = sorted(p.name for p in path.iterdir())[:8] if path.is_dir() else []
        raise CheckpointError(
            f"{path} is not a complete dist-llm checkpoint: no {META} (found {found}); "
            "pass a folder like <out_dir>/checkpoints/step_000000100"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_file}: not a dist-llm checkpoint of version {VERSION}")
    return meta


def saved_config(path: str | Path) -> Config:
    try:
        return config_from_dict(read_meta(path)["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path} was written by an incompatible version of dist-llm: {exc}") from None


def check_model_matches(saved: ModelConfig, wanted: ModelConfig, path) -> None:
    if saved == wanted:
        return
    diffs = [
        f"model.{k}: checkpoint {v!r}, config {getattr(wanted, k)!r}"
        for k, v in dataclasses.asdict(saved).items()
        if v != getattr(wanted, k)
    ]
    shapes = _shape_diffs(saved, wanted)
    if len(shapes) > 10:
        shapes = [*shapes[:10], f"... and {len(shapes) - 10} more parameters"]
    raise CheckpointError(
        f"{path} holds a different model shape:\n  "
        + "\n  ".join(diffs + shapes)
        + "\nset the model section to the checkpoint's (see `dist-llm config show`) or start a new run"
    )


def _shape_diffs(a: ModelConfig, b: ModelConfig) -> list[str]:
    from dist_llm.model.llama import Llama

    with torch.device("meta"):
        sa = {k: tuple(v.shape) for k, v in Llama(a).state_dict().items()}
        sb = {k: tuple(v.shape) for k, v in Llama(b).state_dict().items()}
    out = [
        f"{k}: checkpoint {sa.get(k)}, config {sb.get(k)}"
        for k in sorted(set(sa) | set(sb))
        if sa.get(k) != sb.get(k)
    ]
    return out


def save_weights_only(
    path: str | Path, weights: dict[str, torch.Tensor], config: Config, tokenizer_dir=None, extra_meta=None
) -> Path:
    """A checkpoint that holds weights but no optimizer: for init_from, eval, generate, export
    (what import-hf, prune and quantize write). Written atomically like every checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_portable(
        tmp,
        weights,
        config,
        tokenizer_dir,
        step=0,
        tokens=0,
        world_size=0,
        resumable=False,
        **(extra_meta or {}),
    )
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- load


def load_weights(path: str | Path, model_config: ModelConfig) -> dict[str, torch.Tensor]:
    """The consolidated fp32 weights of a checkpoint (safetensors: nothing is unpickled)."""
    path = Path(path)
    check_model_matches(saved_config(path).model, model_config, path)
    weights = load_file(str(path / WEIGHTS))
    if model_config.tie_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    return weights


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, its config, the checkpoint's tokenizer or None) from any checkpoint."""
    from tokenizers import Tokenizer

    from dist_llm.model.llama import Llama

    config = saved_config(path)
    model = Llama(config.model)
    quantization = read_meta(path).get("quantization")
    if quantization:
        from dist_llm.compress.quantize import finish_loading, prepare_for_loading

        prepare_for_loading(model, quantization)
    model.load_state_dict(load_weights(path, config.model))
    if quantization:
        model = finish_loading(model, quantization)
    tokenizer_file = Path(path) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tokenizer_file)) if tokenizer_file.exists() else None
    if tokenizer is not None:
        tokenizer.encode_special_tokens = True
    return model.to(device).eval(), config, tokenizer


def resume(engine, config: Config, world: World, path: Path) -> tuple[int, int, dict | None]:
    """Restore model, optimizer, scheduler, RNG and data state; return (step, tokens, data state)."""
    meta = read_meta(path)
    check_model_matches(saved_config(path).model, config.model, path)
    if not meta.get("resumable", True):
        raise CheckpointError(
            f"{path} holds weights only (no optimizer state): start from it with checkpoint.init_from"
        )
    if meta["world_size"] != world.size:
        raise CheckpointError(
            f"{path} was saved by {meta['world_size']} processes, this run has {world.size}; "
            "resume with the same number of processes (layout changes need the export path)"
        )
    loaded, _ = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {path}: its DeepSpeed files are missing")
    _restore_rng(torch.load(path / "rng" / f"rank_{world.rank:05d}.pt", weights_only=True))
    states = json.loads((path / "data_state.json").read_text())
    return meta["step"], meta["tokens"], states[world.rank]
