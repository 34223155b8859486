"""LoRA adapters through peft on the plain model's block linears (`lora:` in the config).

peft wraps the model (`get_peft_model`): each targeted nn.Linear gains `lora_A` and `lora_B`,
the rest is frozen, so the optimizer (train/engine.py: `param_groups` takes trainable
parameters only) and the checkpoint (train/checkpoint.py: a LoRA run saves only its trained
parameters, with their Adam moments) hold the adapters alone. The base weights are always
rebuilt from `checkpoint.init_from` (or the seeded initializer), for a resume too.

Each training checkpoint of a LoRA run also holds `adapter/` in peft's own format
(adapter_config.json + adapter_model.safetensors) under Hugging Face module names, so that
`export-hf` of the base plus that folder loads in peft/transformers (`PeftModel.from_pretrained`).
`merge` folds the adapters into the base weights (`merge_and_unload`): a weights-only checkpoint
that every other stage reads.

Tensor and pipeline parallelism replace the nn.Linear layers peft adapts: config.check refuses
them with LoRA. ZeRO 1-3 shard a LoRA run like any other (ZeRO-3 partitions the frozen base too).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from dist_llm.checkpoint import load_model, save_weights_only, saved_config
from dist_llm.config import LoraConfig
from dist_llm.errors import CheckpointError
from dist_llm.model.roles import hf_name

ADAPTER = "adapter"  # the folder in a checkpoint
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# Our module names of the targets ("q" = attention.wq ...) and Hugging Face's (for the export).
MODULES = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w1", "up": "w3", "down": "w2"}
HF_MODULES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
_PREFIX = "base_model.model."  # peft's wrapper around the model


def peft_config(lora: LoraConfig, hf: bool = False):
    import peft

    names = HF_MODULES if hf else MODULES
    return peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=sorted(names[t] for t in lora.target),
        bias="none",
    )


def apply_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """The model wrapped by peft with fresh adapters (B = 0: it computes what the base does);
    only the adapters require gradients."""
    import peft

    return peft.get_peft_model(model, peft_config(lora))


def is_lora(model: nn.Module) -> bool:
    return type(model).__name__ == "PeftModel"


def adapter_name(name: str) -> str:
    """A peft parameter name -> the name a checkpoint stores it under:
    "base_model.model.layers.0.attention.wq.lora_A.default.weight" -> "layers.0.attention.wq.lora_A.weight"."""
    return name.removeprefix(_PREFIX).replace(".default.", ".")


def trained_parameters(model: nn.Module):
    """(stored name, parameter) of the adapters of a peft model."""
    for name, param in model.named_parameters():
        if param.requires_grad:
            yield adapter_name(name), param


def _to_hf(name: str) -> str:
    """ "layers.0.attention.wq.lora_A.weight" -> peft's key over transformers' Llama:
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"."""
    module, _, tail = name.partition(".lora_")
    return _PREFIX + hf_name(module + ".weight").removesuffix(".weight") + ".lora_" + tail


def _from_hf(key: str) -> str:
    module, _, tail = key.removeprefix(_PREFIX).partition(".lora_")
    from dist_llm.model.roles import from_hf_name

    ours = from_hf_name(module + ".weight")
    if ours is None:
        raise CheckpointError(f"adapter weight {key!r} is not on a Llama block linear")
    return ours.removesuffix(".weight") + ".lora_" + tail


def write_adapter(folder: Path, adapters: dict[str, torch.Tensor], lora: LoraConfig, base: str = "") -> None:
    """peft's adapter files in `folder`: adapter_config.json and adapter_model.safetensors,
    under transformers' Llama names (`adapters`: stored name -> full tensor)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {_to_hf(k): v.detach().float().contiguous().cpu() for k, v in adapters.items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    settings = peft_config(lora, hf=True).to_dict()
    settings["target_modules"] = sorted(settings["target_modules"])
    settings.update(base_model_name_or_path=base or None, task_type="CAUSAL_LM")
    (folder / ADAPTER_CONFIG).write_text(json.dumps(settings, indent=2, default=str))


def read_adapter(folder: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(the lora settings, stored name -> tensor) of peft adapter files written by `write_adapter`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{folder} holds no LoRA adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    settings = json.loads((folder / ADAPTER_CONFIG).read_text())
    back = {v: k for k, v in HF_MODULES.items()}
    lora = LoraConfig(
        rank=int(settings["r"]),
        alpha=float(settings["lora_alpha"]),
        dropout=float(settings.get("lora_dropout") or 0.0),
        target=sorted(back[m] for m in settings["target_modules"]),
    )
    return lora, {_from_hf(k): v for k, v in load_file(str(folder / ADAPTER_WEIGHTS)).items()}


def load_adapter(model: nn.Module, adapters: dict[str, torch.Tensor]) -> None:
    """Copy stored adapter tensors into a peft model's adapters (every one must be there)."""
    params = dict(trained_parameters(model))
    if set(params) != set(adapters):
        missing, extra = sorted(set(params) - set(adapters)), sorted(set(adapters) - set(params))
        raise CheckpointError(
            f"the adapter does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(adapters[name])


def merged(model: nn.Module) -> nn.Module:
    """The plain model with the adapters folded into its weights (W + alpha/r * B A)."""
    return model.merge_and_unload()


def merge(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """`dist-llm lora merge`: a LoRA run's checkpoint -> a weights-only checkpoint of the base
    (its `checkpoint.init_from`) with the adapters merged in, for eval, generate, export-hf."""
    checkpoint = Path(checkpoint)
    config = saved_config(checkpoint)
    if not config.lora.rank:
        raise CheckpointError(f"{checkpoint} is not from a LoRA run (its lora.rank is 0): it needs no merge")
    lora, adapters = read_adapter(checkpoint / ADAPTER)
    if config.checkpoint.init_from:
        base, _, _ = load_model(config.checkpoint.init_from)
    else:
        from dist_llm.model.llama import Llama

        base = Llama(config.model, seed=config.train.seed)
    model = apply_lora(base.float().train(), lora)
    load_adapter(model, adapters)
    weights = merged(model).state_dict()
    plain = dataclasses.replace(config, lora=LoraConfig())
    tokenizer = checkpoint if (checkpoint / "tokenizer.json").exists() else None
    return save_weights_only(
        out, weights, plain, tokenizer, {"merged_from": str(checkpoint)}, overwrite=overwrite
    )
