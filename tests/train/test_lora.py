"""LoRA through peft: the adapted forward against W + alpha/r * B A written out, merging, the
adapter files (ours and peft/transformers reading them), and a real DeepSpeed run: only the
adapters hold optimizer state and change, its resume under another ZeRO stage continues it."""

from __future__ import annotations

import copy

import pytest
import torch

from dist_llm.checkpoint import SHARDS, load_model, load_weights, sharded
from dist_llm.config import ConfigError, LoraConfig, load_config
from dist_llm.errors import CheckpointError
from dist_llm.model.llama import Llama
from dist_llm.train.checkpoint import check_resumable
from dist_llm.train.lora import (
    ADAPTER,
    MODULES,
    apply_lora,
    load_adapter,
    merge,
    merged,
    read_adapter,
    trained_parameters,
    write_adapter,
)

from .tune_util import TINY, base_checkpoint, stage

LORA = LoraConfig(rank=4, alpha=8.0, target=["q", "k", "v", "o", "gate", "up", "down"])
TARGET_MODULES = set(MODULES.values())


def _randomized(model):
    """peft starts B at zero (the adapter adds nothing); give every A and B seeded values."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in trained_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _by_hand(base: Llama, model, lora: LoraConfig) -> Llama:
    """The plain model whose targeted weights are W + alpha / r * B @ A, built without peft."""
    adapters = dict(trained_parameters(model))
    reference = copy.deepcopy(base)
    state = reference.state_dict()
    for name in list(state):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGET_MODULES:
            a, b = adapters[f"{module}.lora_A.weight"], adapters[f"{module}.lora_B.weight"]
            state[name] = state[name] + lora.alpha / lora.rank * b @ a
    reference.load_state_dict(state)
    return reference.eval()


def test_adapted_and_merged_forward_equal_base_plus_adapter():
    base = Llama(TINY, seed=0).eval()
    model = _randomized(apply_lora(copy.deepcopy(base), LORA)).eval()
    ids = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _by_hand(base, model, LORA)(ids)
        adapted = model(ids)
        with model.disable_adapter():  # the reference DPO uses under LoRA: the base itself
            plain = model(ids)
        folded = merged(model)(ids)
    assert torch.allclose(adapted, expected, atol=1e-5), (adapted - expected).abs().max()
    assert torch.allclose(folded, expected, atol=1e-5), (folded - expected).abs().max()
    assert torch.equal(plain, base(ids))
    assert (adapted - plain).abs().max() > 1e-2  # the adapters do change the output


def test_only_adapters_require_gradients():
    model = apply_lora(Llama(TINY, seed=0), LoraConfig(rank=2, target=["q", "down"]))
    names = [n for n, _ in trained_parameters(model)]
    assert len(names) == 2 * 2 * TINY.n_layers  # A and B of two targets in every layer
    assert all(".lora_" in n and (".wq." in n or ".w2." in n) for n in names)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert len(frozen) == len(list(Llama(TINY).parameters()))  # the whole base


def test_adapter_files_round_trip_and_load_in_peft_over_the_hf_export(tmp_path, tokenizer_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from dist_llm.interop.hf import export_hf

    base_dir = base_checkpoint(tmp_path / "base", tokenizer_dir)
    base, _, _ = load_model(base_dir)
    model = _randomized(apply_lora(copy.deepcopy(base), LORA)).eval()
    write_adapter(tmp_path / "adapter", dict(trained_parameters(model)), LORA, str(base_dir))
    lora, tensors = read_adapter(tmp_path / "adapter")
    assert lora == LoraConfig(rank=4, alpha=8.0, target=sorted(LORA.target))
    assert all(torch.equal(tensors[k], p) for k, p in trained_parameters(model))
    again = apply_lora(copy.deepcopy(base), lora).eval()
    load_adapter(again, tensors)
    ids = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids)
        assert torch.equal(again(ids), ours)
        hf = LlamaForCausalLM.from_pretrained(export_hf(base_dir, tmp_path / "hf"), dtype=torch.float32)
        theirs = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(ids).logits
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.tensor=2"], r"parallel\.tensor.*lora\.rank=4"),
        (["parallel.context=2"], r"parallel\.context: 2 with lora\.rank=4"),
        (
            ["model.moe.num_experts=4", "model.moe.expert_hidden=64"],
            r"lora\.target: \['down', 'gate', 'up'\]",
        ),
    ],
    ids=["tensor", "context", "moe-experts"],
)
def test_lora_layouts_it_cannot_adapt_are_refused_by_the_config(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", ["lora.rank=4", *overrides])


def _train(data, out, base_dir, *extra):
    return stage(
        "train",
        "--config",
        "configs/tiny.yaml",
        f"data.sources=[{{path: '{data}'}}]",
        f"train.out_dir={out}",
        f"checkpoint.init_from={base_dir}",
        "lora.rank=4",
        "lora.alpha=8.0",
        "train.steps=6",
        "checkpoint.every=3",
        "optim.lr=0.01",
        "optim.min_lr=0.001",
        "logging.val_every=0",
        "logging.tensorboard=false",
        *extra,
    )


def test_lora_run_trains_only_adapters_resumes_and_merges(comedy_shards, tokenizer_dir, tmp_path):
    base_dir = base_checkpoint(tmp_path / "base", tokenizer_dir)
    _train(comedy_shards, tmp_path / "a", base_dir, "parallel.zero_stage=2")
    step3, step6 = (tmp_path / "a" / "checkpoints" / f"step_00000000{s}" for s in (3, 6))
    # The optimizer holds the adapters alone: the shards are their masters and moments.
    names = set(sharded.specs(step6 / SHARDS))
    _, adapters = read_adapter(step6 / ADAPTER)
    expected = {f"{state}/{name}" for state in ("model", "exp_avg", "exp_avg_sq") for name in adapters}
    assert names == expected
    with pytest.raises(CheckpointError, match="lora merge"):
        load_model(step6)
    with pytest.raises(CheckpointError, match=r"saved with lora rank=4 alpha=8\.0"):
        check_resumable(step6, load_config("configs/tiny.yaml", ["lora.rank=2", "lora.alpha=8.0"]))
    # Resumed from step 3 under ZeRO-3 (its frozen base partitioned too): the same step 6.
    _train(comedy_shards, tmp_path / "b", base_dir, "parallel.zero_stage=3", f"checkpoint.resume={step3}")
    _, resumed = read_adapter(tmp_path / "b" / "checkpoints" / "step_000000006" / ADAPTER)
    for name, tensor in adapters.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-6), name
    # Merged: untargeted weights are the base's exactly, targeted ones W + alpha/r * B A.
    out = merge(step6, tmp_path / "merged")
    base, merged_weights = load_weights(base_dir, TINY), load_weights(out, TINY)
    changed = 0
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGET_MODULES:
            delta = 8.0 / 4 * adapters[f"{module}.lora_B.weight"] @ adapters[f"{module}.lora_A.weight"]
            assert torch.allclose(merged_weights[name], weight + delta, atol=1e-6), name
            changed += int(delta.abs().max() > 0)
        else:
            assert torch.equal(merged_weights[name], weight), name
    assert changed == 7 * TINY.n_layers  # every adapter was trained away from B = 0
