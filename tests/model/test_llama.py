"""The plain model against independent references: HF transformers on the same weights, and
itself without a KV cache."""

import pytest
import torch
from transformers import LlamaForCausalLM

from dist_llm.config import ModelConfig
from dist_llm.interop.hf import from_hf_state_dict, hf_config, to_hf_state_dict
from dist_llm.model.llama import KVCache, Llama, attention_inputs, lm_loss, num_params

SHAPES = {
    "gqa": ModelConfig(
        vocab_size=512, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=160, max_seq_len=64
    ),
    "mha-tied": ModelConfig(
        vocab_size=300,
        dim=48,
        n_layers=2,
        n_heads=3,
        n_kv_heads=3,
        ffn_hidden=96,
        max_seq_len=32,
        tie_embeddings=True,
        rope_theta=500000.0,
        norm_eps=1e-6,
    ),
}


@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_transformers(name):
    config = SHAPES[name]
    torch.manual_seed(0)
    ours = Llama(config).eval()
    hf = LlamaForCausalLM(hf_config(config)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), config), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    tokens = torch.randint(0, config.vocab_size, (2, config.max_seq_len))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-5, diff
    # And back: HF weights into a fresh model of ours give the same logits again.
    back = Llama(config).eval()
    back.load_state_dict(from_hf_state_dict(hf.state_dict(), config))
    with torch.no_grad():
        assert torch.equal(back(tokens), ours(tokens))


def test_kv_cache_equals_full_recompute():
    config = SHAPES["gqa"]
    torch.manual_seed(1)
    model = Llama(config).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(config, 2, 40, torch.float32, "cpu")
        pieces = [model(tokens[:, :17], cache)] + [model(tokens[:, t : t + 1], cache) for t in range(17, 40)]
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() < 1e-5


def test_init_and_counts():
    config = ModelConfig(vocab_size=1000, dim=64, n_layers=4, n_heads=4, n_kv_heads=4, ffn_hidden=128)
    model = Llama(config)
    assert model.layers[0].attention.wo.weight.std().item() == pytest.approx(0.02 / (8**0.5), rel=0.15)
    assert model.layers[0].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.1)
    per_layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert num_params(model) == 2 * 1000 * 64 + 4 * per_layer + 64
    tied = Llama(
        ModelConfig(
            vocab_size=1000, dim=64, n_layers=4, n_heads=4, n_kv_heads=4, ffn_hidden=128, tie_embeddings=True
        )
    )
    assert num_params(tied) == num_params(model) - 1000 * 64


def test_loss_ignores_masked_labels():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    masked = labels.clone()
    masked[:, :2] = -100
    expected = torch.nn.functional.cross_entropy(logits[:, 2:].reshape(-1, 11), labels[:, 2:].reshape(-1))
    assert torch.allclose(lm_loss(logits, masked), expected)


@pytest.mark.parametrize("reset_positions", [False, True])
def test_a_chunk_of_rows_gets_its_own_positions_and_the_whole_rows_mask(reset_positions):
    """Context parallelism runs the model on positions 16..32 of 32-token rows (`offset`): its
    rotary tables are those positions of the whole rows, and its mask is the whole rows' one."""
    config = ModelConfig(
        vocab_size=64,
        dim=32,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=64,
        reset_positions=reset_positions,
    )
    model = Llama(config)
    documents = (torch.arange(32) >= 10).int().expand(2, 32)
    full = attention_inputs(config, model.rope_cos, model.rope_sin, 32, documents)
    chunk = attention_inputs(config, model.rope_cos, model.rope_sin, 16, documents, start=16)
    assert torch.equal(chunk[0], full[0][..., 16:32, :]) and torch.equal(chunk[1], full[1][..., 16:32, :])
    assert torch.equal(chunk[2], full[2]) and chunk[2].shape == (2, 1, 32, 32)
