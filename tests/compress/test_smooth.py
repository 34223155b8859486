"""SmoothQuant: folding the scales changes nothing in fp32 (grouped key/value heads included),
and with outlier channels injected into the activations, int8-dynamic's error is lower
smoothed than not."""

import copy

import pytest
import torch

from dist_llm.compress.quantize import quantize_model
from dist_llm.compress.smooth import activation_maxima, smooth_model
from dist_llm.model.quantized import finish_loading


@pytest.fixture
def model(tmp_path, tokenizer_dir):
    from .test_prune import tiny

    net, _, _ = tiny(tmp_path, tokenizer_dir, n_layers=2)  # 4 query heads on 2 key/value heads
    return net


def with_outliers(net):
    """A few channels 30-50x larger in every smoothed input: the norms' outputs (q/k/v and
    w1/w3 inputs), the values (wo's input) and w3's outputs (w2's input)."""
    net = copy.deepcopy(net)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in net.layers:
            for norm in (block.attention_norm, block.ffn_norm):
                norm.weight[torch.randperm(norm.weight.numel(), generator=g)[:3]] *= 40
            block.attention.wv.weight[
                torch.randperm(block.attention.wv.weight.shape[0], generator=g)[:2]
            ] *= 30
            block.feed_forward.w3.weight[
                torch.randperm(block.feed_forward.w3.weight.shape[0], generator=g)[:3]
            ] *= 50
    return net


def test_smoothing_keeps_the_fp32_function(model):
    net = with_outliers(model)
    calib = [torch.randint(0, 2048, (4, 32))]
    tokens = torch.randint(0, 2048, (2, 32))
    with torch.no_grad():
        before = net(tokens)
        maxima = activation_maxima(net, calib)
        smoothed = copy.deepcopy(net)
        smooth_model(smoothed, maxima, 0.5)
        after = smoothed(tokens)
    changed = [
        name
        for name, p in smoothed.named_parameters()
        if not torch.allclose(p, dict(net.named_parameters())[name])
    ]
    # every norm, every block linear (wq/wk/wv/wo/w1/w2/w3) was rescaled
    assert len(changed) == 9 * len(net.layers), changed
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * before.abs().max())


def dynamic_int8_error(net, calib, tokens, alpha):
    net = copy.deepcopy(net)
    with torch.no_grad():
        reference = net(tokens)
        if alpha:
            smooth_model(net, activation_maxima(net, calib), alpha)
        quantize_model(net, "int8-dynamic", 0)
        net = finish_loading(net, {"method": "int8-dynamic", "group_size": 0})
        return ((net(tokens) - reference).norm() / reference.norm()).item()


def test_smoothing_lowers_int8_dynamic_error_with_outlier_channels(model):
    net = with_outliers(model)
    calib = [torch.randint(0, 2048, (8, 32))]
    tokens = torch.randint(0, 2048, (4, 32))
    plain = dynamic_int8_error(net, calib, tokens, 0.0)
    smoothed = dynamic_int8_error(net, calib, tokens, 0.5)
    assert smoothed < 0.5 * plain, (smoothed, plain)
