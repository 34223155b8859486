"""Document-masked attention: a packed row of documents against each document run alone."""

import warnings

import pytest
import torch

from dist_llm.config import ModelConfig
from dist_llm.model.attention import attend, document_mask, document_positions
from dist_llm.model.llama import Llama, lm_loss

TOLERANCE = 1e-5
LENGTHS = (7, 12, 5)  # three documents packed into one row of 24 tokens


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32)
    return ModelConfig(**{**base, **overrides})


def packed_row(vocab: int):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (1, sum(LENGTHS)), generator=g)
    documents = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)]).unsqueeze(0)
    return tokens, documents


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    return out


@pytest.mark.parametrize("reset_positions", [False, True], ids=["positions-run-on", "positions-restart"])
def test_packed_row_equals_each_document_alone(reset_positions):
    """Logits and gradients of a row of three documents equal those of the three run one by one
    (rotary attention depends on relative positions only, so this holds whether or not positions
    restart at each document)."""
    torch.manual_seed(0)
    model = Llama(tiny(attention="document", reset_positions=reset_positions), seed=3)
    tokens, documents = packed_row(97)
    labels = torch.randint(0, 97, tokens.shape)
    packed = model(tokens, document_ids=documents)
    lm_loss(packed, labels, reduction="sum").backward()
    packed_grads = grads(model)

    alone, begin = [], 0
    for n in LENGTHS:
        logits = model(tokens[:, begin : begin + n])
        lm_loss(logits, labels[:, begin : begin + n], reduction="sum").backward()
        alone.append(logits)
        begin += n
    alone_grads = grads(model)
    assert (packed - torch.cat(alone, dim=1)).abs().max() <= TOLERANCE
    worst = max((packed_grads[k] - alone_grads[k]).abs().max().item() for k in packed_grads)
    assert worst <= TOLERANCE


def test_causal_attention_reads_across_documents():
    """model.attention=causal ignores the document ids: the same logits as no ids at all, and
    different from the document-masked model with the same weights."""
    tokens, documents = packed_row(97)
    causal = Llama(tiny(attention="causal"), seed=3)
    masked = Llama(tiny(attention="document"), seed=3)
    with torch.no_grad():
        plain = causal(tokens)
        assert torch.equal(causal(tokens, document_ids=documents), plain)
        assert (masked(tokens, document_ids=documents) - plain).abs().max() > 1e-3
        # the first document sees nothing before it: identical under both
        first = LENGTHS[0]
        assert torch.allclose(masked(tokens, document_ids=documents)[:, :first], plain[:, :first], atol=1e-6)


def test_flex_block_mask_equals_dense_mask():
    """The CUDA path's block mask (flex_attention, run here uncompiled, forward only) selects the
    same keys as the dense mask SDPA gets on CPU, over several rows and a block boundary."""
    g = torch.Generator().manual_seed(1)
    batch, seq = 2, 160  # past flex's 128-token block
    documents = torch.stack([torch.randint(0, 2, (seq,), generator=g).cumsum(0) // 40 for _ in range(batch)])
    q = torch.randn(batch, 4, seq, 16, generator=g)
    k, v = torch.randn(2, batch, 2, seq, 16, generator=g)
    dense = attend(q, k, v, document_mask(documents, "sdpa"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        flex = attend(q, k, v, document_mask(documents, "flex"))
    assert (dense - flex).abs().max() <= TOLERANCE


def test_document_positions_restart_at_each_document():
    documents = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 3, 3]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 0, 1, 2, 3, 4, 0, 0, 1]])
    assert torch.equal(document_positions(documents), expected)


def test_document_mask_is_built_once_per_batch():
    """Pipeline stages pass one document_ids tensor along: the mask is reused, not rebuilt."""
    documents = torch.tensor([[0, 0, 1, 1]])
    assert document_mask(documents, "sdpa") is document_mask(documents, "sdpa")
    assert document_mask(documents.clone(), "sdpa") is not document_mask(documents, "sdpa")


def test_layers_share_one_saved_mask():
    """Each SDPA call keeps its mask for backward: all the layers of a forward must keep the same
    tensor (SDPA's own conversion of a boolean mask made a copy per layer: 8 GiB at 16k)."""
    documents = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]])
    mask = document_mask(documents, "sdpa")
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h = q
        for _ in range(4):
            h = attend(h, h[:, :1], h[:, :1], mask) + h
    masks = {t.untyped_storage().data_ptr() for t in saved if t.shape == (1, 1, 8, 8)}
    assert len(masks) == 1
    h.sum().backward()  # and backward still runs through it
    assert torch.isfinite(q.grad).all()


def test_generation_with_a_cache_takes_no_document_ids():
    from dist_llm.model.llama import KVCache

    config = tiny()
    model = Llama(config)
    tokens, documents = packed_row(97)
    cache = KVCache(config, 1, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="generation with a cache is one document"):
        model(tokens, cache, document_ids=documents)
