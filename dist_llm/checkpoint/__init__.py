"""The one checkpoint format of every stage: its files, finding and checking a checkpoint,
weights-only checkpoints, and loading a model from any checkpoint.

```
<out_dir>/checkpoints/
  latest                  name of the newest complete checkpoint (replaced atomically)
  step_000300/
    dist_llm.json         step, tokens seen, the resolved config; written last = complete
    model.safetensors     consolidated fp32 weights (what eval, generate and export read)
    optimizer.safetensors Adam's moments of every parameter, full and by plain-model name
    data_state.json       the data loader's state of every data-parallel rank
    rng/rank_00000.pt     RNG states per rank (tensors only: loads with weights_only=True)
    tokenizer.json ...    the tokenizer the data was made with
    mp_rank_*, layer_*, *optim_states.pt    DeepSpeed's own files (model, optimizer, scheduler)
                          of the layout that saved it
```

A weights-only checkpoint (import-hf, prune, quantize, `checkpoint consolidate`) holds
dist_llm.json, model.safetensors and the tokenizer. The `dist-llm checkpoint` commands are here
too: verify.py, consolidate.py (streaming, through stream.py's safetensors writer) and convert.py
(a checkpoint from before sharding into shards). Saving and resuming a training run is
`train/checkpoint.py`'s; everything here sits below train/, parallel/, compress/, eval/ and
interop/, which all read it.
"""

from dist_llm.checkpoint.format import (
    FORMAT,
    META,
    OPTIMIZER,
    SHARDS,
    TOKENIZER_FILES,
    VERSION,
    WEIGHTS,
    check_model_matches,
    checkpoint_root,
    is_sharded,
    latest,
    newest_intact,
    read_meta,
    saved_config,
    saved_layout,
    verify_files,
)
from dist_llm.checkpoint.weights import (
    WEIGHTS_ONLY,
    is_weights_only,
    iter_weights,
    load_model,
    load_weights,
    read_weights,
    save_weights_only,
    weight_bytes,
    weight_specs,
    write_meta,
    write_portable,
    write_weights_only,
)

__all__ = [
    "FORMAT",
    "META",
    "OPTIMIZER",
    "SHARDS",
    "TOKENIZER_FILES",
    "VERSION",
    "WEIGHTS",
    "WEIGHTS_ONLY",
    "check_model_matches",
    "checkpoint_root",
    "is_sharded",
    "is_weights_only",
    "iter_weights",
    "latest",
    "load_model",
    "load_weights",
    "newest_intact",
    "read_meta",
    "read_weights",
    "save_weights_only",
    "saved_config",
    "saved_layout",
    "verify_files",
    "weight_bytes",
    "weight_specs",
    "write_meta",
    "write_portable",
    "write_weights_only",
]
