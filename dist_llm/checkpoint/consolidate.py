"""`dist-llm checkpoint consolidate`: a training checkpoint's weights as a weights-only
checkpoint (what import-hf writes: model.safetensors, the tokenizer, dist_llm.json with
"resumable": false), for eval, generate, the compression stages or copying elsewhere.

Streaming: the weights are read and written one tensor at a time (checkpoint/stream.py), so a
model consolidates on a host with less memory than the model; the Adam moments are not read.
"""

from __future__ import annotations

from pathlib import Path

from dist_llm.checkpoint.format import WEIGHTS, read_meta, saved_config
from dist_llm.checkpoint.stream import order, write_safetensors
from dist_llm.checkpoint.weights import WEIGHTS_ONLY, iter_weights, weight_specs, write_meta
from dist_llm.errors import CheckpointError
from dist_llm.files import check_output_dir, staged_output


def consolidate(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write `out` from a training checkpoint (sharded, or of the format before sharding);
    replaces only a weights-only checkpoint there, and only with `overwrite`."""
    checkpoint, out = Path(checkpoint), Path(out)
    meta = read_meta(checkpoint)  # every file it lists is there at its size
    if meta.get("resumable") is False:
        raise CheckpointError(
            f"{checkpoint} is a weights-only checkpoint already: there is nothing to consolidate"
        )
    config = saved_config(checkpoint)
    check_output_dir(out, WEIGHTS_ONLY, overwrite)  # before any weight is read
    specs = weight_specs(checkpoint)
    with staged_output(out, WEIGHTS_ONLY, overwrite) as staging:
        write_safetensors(staging / WEIGHTS, specs, iter_weights(checkpoint, order(specs)))
        write_meta(
            staging,
            config,
            checkpoint,  # its tokenizer files
            step=meta["step"],
            tokens=meta["tokens"],
            world_size=0,
            resumable=False,
            consolidated_from=str(checkpoint.resolve()),
        )
    return out
