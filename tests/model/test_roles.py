"""The table of parameter roles against the model it describes, transformers' names, and the
tensor-parallel plan the code had before the table existed."""

import ast
import dataclasses
import fnmatch
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from dist_llm.config import ModelConfig, MoEConfig
from dist_llm.interop.hf import hf_config
from dist_llm.model import roles
from dist_llm.model.llama import Llama
from dist_llm.model.roles import (
    ROLES,
    from_hf_name,
    hf_name,
    pad_vocab,
    padded_vocab,
    parameter_names,
    role_of,
    stored_name,
    tie,
    untie,
)
from dist_llm.parallel.tensor import (
    PLAN,
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelOutput,
)

SHAPES = [
    ModelConfig(vocab_size=101, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=48),
    ModelConfig(vocab_size=512, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=160),
    ModelConfig(
        vocab_size=300, dim=48, n_layers=12, n_heads=3, n_kv_heads=3, ffn_hidden=96, tie_embeddings=True
    ),
    ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, head_dim=16),
]
CONFIGS = [c for shape in SHAPES for c in (shape, dataclasses.replace(shape, tie_embeddings=True))]


def _names(config: ModelConfig) -> list[str]:
    with torch.device("meta"):
        return [n for n, _ in Llama(config).named_parameters(remove_duplicate=False)]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_parameter_matches_exactly_one_row(config):
    names = _names(config)
    for name in names:
        rows = [r for r in ROLES if fnmatch.fnmatchcase(name, r.pattern)]
        assert len(rows) == 1, (name, rows)
        assert role_of(name) is rows[0]
    # no row describes nothing: the dense model has every row but the MoE layers' ones
    assert {role_of(n) for n in names} == {r for r in ROLES if r.layers in ("all", "dense")}
    assert sorted(parameter_names(config)) == sorted(names)


def test_an_moe_model_with_dense_layers_and_shared_experts_has_every_row():
    """MoE in layers 2 and 4 of 4 (model.moe.every=2), a shared expert in each."""
    moe = MoEConfig(num_experts=4, top_k=2, every=2, shared_expert_hidden=16)
    config = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=64, moe=moe)
    names = _names(config)
    for name in names:
        assert [r for r in ROLES if fnmatch.fnmatchcase(name, r.pattern)] == [role_of(name)]
    assert {role_of(n) for n in names} == set(ROLES)
    assert sorted(parameter_names(config)) == sorted(names)
    assert "layers.1.feed_forward.experts.w1" in names and "layers.0.feed_forward.w1.weight" in names


def test_unknown_names_are_refused():
    for name in ("layers.0.attention.wq", "layers.x.ffn_norm.weight", "output.bias", "rope_cos"):
        with pytest.raises(KeyError):
            role_of(name)
    assert from_hf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


@pytest.mark.parametrize("config", CONFIGS)
def test_hf_names_round_trip_and_equal_transformers_keys(config):
    hf = LlamaForCausalLM(hf_config(config))
    ours = parameter_names(config)
    assert {hf_name(n) for n in ours} == set(hf.state_dict())
    assert all(from_hf_name(hf_name(n)) == n for n in ours)
    assert all(hf_name(from_hf_name(k)) == k for k in hf.state_dict())


@pytest.mark.parametrize("tied", [False, True])
def test_tie_and_untie_round_trip(tied):
    config = dataclasses.replace(SHAPES[1], tie_embeddings=tied)
    state = Llama(config).state_dict()
    stored = untie(state, config)
    assert ("output.weight" in stored) is not tied
    assert stored_name("output.weight", config) == ("tok_embeddings.weight" if tied else "output.weight")
    again = tie(stored, config)
    assert list(again) == list(state) and all(again[k] is state[k] for k in state if k != "output.weight")
    if tied:
        assert again["output.weight"] is again["tok_embeddings.weight"]
    else:
        assert again["output.weight"] is state["output.weight"]


def test_tp_plan_from_the_table_equals_the_old_plan():
    old_plan = {
        "tok_embeddings": VocabParallelEmbedding,
        "layers.*.attention.wq": ColumnParallelLinear,
        "layers.*.attention.wk": ColumnParallelLinear,
        "layers.*.attention.wv": ColumnParallelLinear,
        "layers.*.attention.wo": RowParallelLinear,
        "layers.*.feed_forward.w1": ColumnParallelLinear,
        "layers.*.feed_forward.w3": ColumnParallelLinear,
        "layers.*.feed_forward.w2": RowParallelLinear,
        "output": VocabParallelOutput,
    }
    assert old_plan == PLAN


def test_init_scaling_and_pruning_read_the_rows_they_used_to_spell_out():
    residual = {r.pattern for r in ROLES if r.residual}
    assert residual == {
        "layers.*.attention.wo.weight",
        "layers.*.feed_forward.w2.weight",
        "layers.*.feed_forward.experts.w2",  # MoE layers' projections back into the stream
        "layers.*.feed_forward.shared.w2.weight",
    }
    assert {r.pattern for r in ROLES if r.kind == roles.NORM} == {
        "layers.*.attention_norm.weight",
        "layers.*.ffn_norm.weight",
        "norm.weight",
    }
    old_linears = (
        "attention.wq",
        "attention.wk",
        "attention.wv",
        "attention.wo",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    )
    assert sorted(roles.BLOCK_LINEARS) == sorted(old_linears)
    # the dimension of size model.dim, for each weight's actual shape
    config = SHAPES[1]
    for name, p in Llama(config).named_parameters(remove_duplicate=False):
        assert p.shape[role_of(name).hidden_dim] == config.dim, name


def test_vocabulary_padding():
    assert padded_vocab(101, 2) == 102 and padded_vocab(100, 4) == 100
    w = torch.ones(5, 3)
    padded = pad_vocab(w, 0, 8)
    assert padded.shape == (8, 3) and torch.equal(padded[:5], w) and not padded[5:].any()
    assert pad_vocab(w, 0, 5) is w


def test_the_table_imports_nothing_above_the_model():
    tree = ast.parse(Path(roles.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    above = ("dist_llm.parallel", "dist_llm.train", "dist_llm.compress", "dist_llm.interop")
    assert not [m for m in imported if m.startswith(above)], imported
