"""Options applied to the model from outside must not change its maths or its parameter names."""

import torch

from dist_llm.config import ModelConfig
from dist_llm.model.llama import Llama, lm_loss
from dist_llm.train.start import prepare_blocks


def grads(model, tokens):
    model.zero_grad()
    lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_activation_checkpointing_keeps_gradients_and_names():
    config = ModelConfig(
        vocab_size=300, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64
    )
    torch.manual_seed(0)
    plain = Llama(config)
    recomputed = Llama(config)
    recomputed.load_state_dict(plain.state_dict())
    prepare_blocks(recomputed, recompute=True)
    assert list(recomputed.state_dict()) == list(plain.state_dict())
    tokens = torch.randint(0, 300, (2, 33))
    a, b = grads(plain, tokens), grads(recomputed, tokens)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_compiled_blocks_are_compiled_even_when_recomputed():
    """torch.compile inside the recomputation: dynamo captures the block, gradients unchanged."""
    import torch._dynamo

    config = ModelConfig(
        vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64
    )
    plain = Llama(config)
    both = Llama(config)
    both.load_state_dict(plain.state_dict())
    prepare_blocks(both, recompute=True, compile=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    tokens = torch.randint(0, 300, (2, 17))
    a, b = grads(plain, tokens), grads(both, tokens)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert list(both.state_dict()) == list(plain.state_dict())
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), max((a[k] - b[k]).abs().max() for k in a)
