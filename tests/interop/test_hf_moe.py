"""Mixture-of-experts models against transformers' Mixtral on the same weights: export, import
and the router's load-balancing loss."""

import pytest
import torch
from transformers import MixtralForCausalLM, Qwen2MoeForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from dist_llm.checkpoint import load_model, save_weights_only
from dist_llm.cli import main
from dist_llm.config import Config, MoEConfig
from dist_llm.errors import CheckpointError
from dist_llm.interop.hf import export_hf, hf_config
from dist_llm.model.llama import Llama
from dist_llm.model.moe import moe_layers, router_loss

from ..checkpoint.builders import model_state, tiny_config


def moe_config(**moe) -> Config:
    return tiny_config(ffn_hidden=96, moe=MoEConfig(**{"num_experts": 4, "top_k": 2, **moe}))


def test_export_loads_as_mixtral_with_equal_logits(tmp_path):
    config = moe_config()
    weights = model_state(config)
    ckpt = save_weights_only(tmp_path / "ckpt", weights, config, None)
    assert main(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = Llama(config.model).eval()
    ours.load_state_dict(weights)
    tokens = torch.randint(0, 2048, (2, 48))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() <= 1e-5


def test_import_of_a_transformers_mixtral_and_its_router_loss(tmp_path):
    """Import gives the same logits; our load-balancing loss per layer is transformers' formula
    on each layer's router logits (transformers pools all layers' tokens into one loss, which
    is the same for a single layer), times the coefficient, averaged over the layers."""
    config = moe_config(aux_loss_coef=0.02).model
    torch.manual_seed(2)
    hf = MixtralForCausalLM(hf_config(config)).eval()
    hf.save_pretrained(tmp_path / "hf")  # the hub's layout: one tensor per expert
    assert main(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    ours, saved, _ = load_model(tmp_path / "ours")
    assert saved.model == config
    tokens = torch.randint(0, 2048, (2, 48))
    with torch.no_grad():
        out = hf(tokens, output_router_logits=True)
        assert (out.logits - ours(tokens)).abs().max().item() <= 1e-5
        per_layer = [load_balancing_loss_func((logits,), 4, 2) for logits in out.router_logits]
        expected = 0.02 * sum(per_layer) / len(per_layer)
        assert abs(router_loss(ours).item() - expected.item()) <= 1e-6
        # Each layer's load is the share of routes per expert, the top-2 of the router's softmax.
        for (_, layer), logits in zip(moe_layers(ours), out.router_logits, strict=True):
            top = logits.softmax(-1).topk(2).indices.flatten()
            assert torch.equal(layer.stats.load, torch.bincount(top, minlength=4) / top.numel())


def test_capacity_drops_routes_past_it_in_training_only():
    config = moe_config(capacity_factor=0.5).model
    model = Llama(config)
    layer = moe_layers(model)[0][1]
    x = torch.randn(1, 32, 64)
    dropless = Llama(moe_config().model)
    dropless.load_state_dict(model.state_dict())
    twin = moe_layers(dropless)[0][1]
    with torch.no_grad():
        model.eval(), dropless.eval()
        assert torch.equal(layer(x), twin(x))  # evaluation is dropless
        model.train(), dropless.train()
        assert not torch.allclose(layer(x), twin(x))
    # Each expert keeps at most ceil(0.5 * 32 * 2 / 4) = 8 routes, in token order.
    from dist_llm.model.moe import drop_over_capacity

    experts = torch.tensor([[0, 1]] * 10 + [[2, 3]] * 2)
    kept, weights = drop_over_capacity(experts, torch.ones(12, 2), 4, 0.5)
    assert (kept[:3] >= 0).all() and (kept[3:10] == -1).all() and (kept[10:] >= 0).all()
    assert weights[3:10].sum() == 0


def test_qwen2_moe_both_ways_with_shared_experts_and_dense_layers(tmp_path):
    """A shared expert, MoE in every other layer and raw (not renormalised) top-k weights:
    Qwen2-MoE's shape. Import of transformers' model and export of ours give equal logits."""
    config = moe_config(shared_expert_hidden=48, every=2, normalize_top_k=False, expert_hidden=32)
    torch.manual_seed(3)
    hf = Qwen2MoeForCausalLM(hf_config(config.model)).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    ours, saved, _ = load_model(tmp_path / "ours")
    assert saved.model == config.model
    tokens = torch.randint(0, 2048, (2, 48))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() <= 1e-5
    weights = model_state(config, seed=4)
    ckpt = save_weights_only(tmp_path / "ckpt", weights, config, None)
    assert main(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "back")]) == 0
    exported = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "back").eval()
    ours = Llama(config.model).eval()
    ours.load_state_dict(weights)
    with torch.no_grad():
        assert (exported(tokens).logits - ours(tokens)).abs().max().item() <= 1e-5


def test_export_refuses_what_neither_architecture_holds(tmp_path):
    config = moe_config(every=2)  # dense layers between MoE ones, but no shared expert
    ckpt = save_weights_only(tmp_path / "ckpt", model_state(config), config, None)
    with pytest.raises(CheckpointError, match="Qwen2MoeForCausalLM"):
        export_hf(ckpt, tmp_path / "hf")
