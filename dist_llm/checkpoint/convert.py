"""`dist-llm checkpoint convert`: a training checkpoint of the format before sharding
(model.safetensors + optimizer.safetensors + DeepSpeed's own files) into the sharded format,
so that it resumes, in any layout, as every sharded checkpoint does.

The old checkpoint is never changed, moved or deleted: the new one is written beside it as
`<OLD>.sharded` (or at --out), through a staging folder swapped into place (files.staged_output),
and a run resumes from it with `checkpoint.resume=<NEW>`. `latest` is left alone: it is the
run's record of what it saved. Each full tensor becomes one piece of the shards; dist_llm.json
keeps every key but the file list (listed anew) and records `converted_from`; data_state.json,
rng/ and the tokenizer are copied; DeepSpeed's files are left behind (nothing reads them now).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file

from dist_llm.checkpoint import sharded
from dist_llm.checkpoint.format import (
    FORMAT,
    META,
    OPTIMIZER,
    SHARDS,
    TOKENIZER_FILES,
    WEIGHTS,
    is_sharded,
    read_meta,
    saved_config,
    verify_files,
)
from dist_llm.checkpoint.weights import write_meta
from dist_llm.config import Config
from dist_llm.errors import CheckpointError
from dist_llm.files import OutputKind, check_output_dir, staged_output
from dist_llm.model.roles import parameter_names, untie

SUFFIX = ".sharded"
MOMENTS = ("exp_avg", "exp_avg_sq")  # optimizer.safetensors and the shards: "<moment>/<name>"
DATA_STATE = "data_state.json"
RNG = "rng"
_NEW_KEYS = ("format", "version", "files", "config")  # what write_meta writes afresh

log = logging.getLogger(__name__)


def is_converted(path: Path) -> bool:
    """A checkpoint this command wrote: the only kind it replaces (with --overwrite), so that
    no --overwrite ever replaces a checkpoint a run saved."""
    try:
        meta = json.loads((Path(path) / META).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("format") == FORMAT
        and "converted_from" in meta
        and is_sharded(path)
    )


CONVERTED = OutputKind(
    "a converted checkpoint",
    f'a sharded checkpoint whose {META} names "converted_from", as `dist-llm checkpoint convert` writes',
    is_converted,
)


def default_out(old: Path) -> Path:
    old = Path(os.path.abspath(old))  # "." or "step_1/.." have no name to put a sibling beside
    return old.parent / f"{old.name}{SUFFIX}"


def advice(path: Path) -> str:
    """What to do with a checkpoint from before sharding: what a refused resume says."""
    new = default_out(path)
    if is_converted(new):
        return f"it was converted to {new}: resume from that with checkpoint.resume={new}"
    return (
        f"convert it once with `dist-llm checkpoint convert {path}` (it is kept as it is), "
        f"then resume from the copy with checkpoint.resume={new}"
    )


def convert(old: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the sharded copy of `old` at `out` (default `<old>.sharded`); returns its path."""
    old = Path(old)
    meta = read_meta(old, verify=False)
    _check_convertible(old, meta)
    out = default_out(old) if out is None else Path(out)
    check_output_dir(out, CONVERTED, overwrite)  # before anything is read
    config = saved_config(old)
    shards = _shards(old, config)
    with staged_output(out, CONVERTED, overwrite) as staging:
        sharded.save(staging / SHARDS, shards)
        shutil.copyfile(old / DATA_STATE, staging / DATA_STATE)
        shutil.copytree(old / RNG, staging / RNG)
        kept = {k: v for k, v in meta.items() if k not in _NEW_KEYS}
        write_meta(staging, config, old, **kept, converted_from=str(old.resolve()))
    if config.train.dtype == "fp16":
        log.warning(
            "%s trained in fp16: its loss scale was only in DeepSpeed's files, so the resumed run "
            "starts from the initial loss scale (its first steps may be skipped as overflows)",
            old,
        )
    return out


def _check_convertible(old: Path, meta: dict) -> None:
    if is_sharded(old):
        raise CheckpointError(f"{old} is in the sharded format already: resume from it as it is")
    if meta.get("resumable") is False:
        raise CheckpointError(
            f"{old} holds weights only (no optimizer state): there is nothing to resume; "
            f"start a run from it with checkpoint.init_from={old}"
        )
    if not (old / OPTIMIZER).is_file():
        raise CheckpointError(
            f"{old} has no {OPTIMIZER}: it was saved under ZeRO-0 (parallel.zero_stage=0), whose Adam "
            "moments are only in DeepSpeed's own pickled files, which dist-llm does not read; it cannot "
            f"be converted. Start a run from its weights with checkpoint.init_from={old} "
            "(the optimizer state, the schedule and the data stream start afresh)"
        )
    for needed in (DATA_STATE, RNG):
        if not (old / needed).exists():
            raise CheckpointError(
                f"{old / needed} is missing; the checkpoint is damaged: use the one before it"
            )
    # Only what is copied must be intact: DeepSpeed's files are not read.
    read = (WEIGHTS, OPTIMIZER, DATA_STATE, *TOKENIZER_FILES)
    listed = meta.get("files") or {}
    verify_files(old, {"files": {n: s for n, s in listed.items() if n in read or n.startswith(f"{RNG}/")}})


def _shards(old: Path, config: Config) -> sharded.Shards:
    """Every full tensor as one piece: {"model/<name>", "exp_avg/<name>", "exp_avg_sq/<name>"}.
    The tensors map their files (safetensors' load_file): pages are read as they are written."""
    weights = load_file(str(old / WEIGHTS))
    moments = load_file(str(old / OPTIMIZER))
    names = sorted(untie(dict.fromkeys(parameter_names(config.model)), config.model))
    _check_names(old / WEIGHTS, set(weights), names)
    for moment in MOMENTS:
        prefix = f"{moment}/"
        _check_names(
            old / OPTIMIZER, {k.removeprefix(prefix) for k in moments if k.startswith(prefix)}, names
        )
    tensors = {f"model/{n}": weights[n] for n in names}
    tensors.update({f"{m}/{n}": moments[f"{m}/{n}"] for m in MOMENTS for n in names})
    for key, tensor in tensors.items():
        name = key.split("/", 1)[1]
        if tensor.shape != weights[name].shape:
            raise CheckpointError(
                f"{old / OPTIMIZER}: {key} is {tuple(tensor.shape)}, the weight {tuple(weights[name].shape)}"
            )
    return {
        k: sharded.Sharded(tuple(t.shape), [sharded.Piece((0,) * t.dim(), t)]) for k, t in tensors.items()
    }


def _check_names(file: Path, held: set[str], names: list[str]) -> None:
    missing, extra = sorted(set(names) - held), sorted(held - set(names))
    if missing or extra:
        raise CheckpointError(
            f"{file} does not hold the model of its config: missing {missing[:5]}, unexpected {extra[:5]}"
        )
