"""int8-dynamic (W8A8, activations per token): the int8 x int8 -> int32 product is exact, the
layer equals its float64 reference to float rounding and a plain fp32 linear to int8 error, each
token's scale is its own, and an int8 weight-only layer's codes carry over unchanged."""

import pytest
import torch
from torch import nn

from dist_llm.model.quantized import (
    DynamicInt8Linear,
    QuantLinear,
    int8_matmul,
    int8_matmul_float64,
    quantize_rows,
)


def codes(*shape: int) -> torch.Tensor:
    return torch.randint(-127, 128, shape, dtype=torch.int8)


@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (1, 7, 5), (17, 64, 40), (33, 13, 24)])
def test_int8_matmul_is_the_exact_integer_product(m, k, n):
    torch.manual_seed(0)
    a, w = codes(m, k), codes(n, k)
    product = int8_matmul(a, w.t())  # the layer's operands: the stored [out, in] codes, transposed
    assert product.dtype == torch.int32
    assert torch.equal(product.long(), a.long() @ w.long().t())


def test_the_float64_route_is_exact_where_float32_is_not():
    """The fallback (devices or shapes _int_mm does not take) in float64: exact past 2^24."""
    a = torch.full((2, 4096), 127, dtype=torch.int8)
    w = torch.full((3, 4096), -127, dtype=torch.int8)
    w[0, 0] = -126  # row 0: -127^2 * 4096 + 127 = -66,064,257, odd, above 2^25: no float32
    expected = a.long() @ w.long().t()
    assert expected[0, 0] == -66_064_257
    assert torch.equal(int8_matmul_float64(a, w.t()).long(), expected)
    assert not torch.equal((a.float() @ w.float().t()).long(), expected)


def linear_and_layer(k=96, n=80):
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=False)
    return linear, DynamicInt8Linear.from_linear(linear)


@pytest.mark.parametrize("shape", [(1, 1, 96), (1, 32, 96), (3, 7, 96)])
def test_layer_equals_its_float64_reference(shape):
    _, q = linear_and_layer()
    x = torch.randn(shape)
    x[..., 5] *= 30  # an outlier channel, as real activations have
    fast, reference = q(x), q.reference_forward(x)
    assert fast.shape == reference.shape == (*shape[:-1], 80)
    # fp32 scales and rescaling against float64 ones: float rounding, not quantization error
    assert (fast - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_layer_is_within_int8_error_of_the_fp32_linear():
    linear, q = linear_and_layer()
    x = torch.randn(64, 96)
    with torch.no_grad():
        exact = linear(x)
    error = (q(x) - exact).norm() / exact.norm()
    assert error < 0.02, error  # two roundings to 1/254 of a range: ~0.5-1% here
    assert q(x.bfloat16()).dtype == torch.bfloat16


def test_each_token_has_its_own_scale():
    """Per token, a large row changes nothing in the others (one scale per batch would)."""
    _, q = linear_and_layer()
    x = torch.randn(4, 96)
    loud = x.clone()
    loud[0] *= 1000
    assert torch.equal(q(loud)[1:], q(x)[1:])
    codes_, scale = quantize_rows(x)
    assert codes_.dtype == torch.int8 and scale.shape == (4, 1)
    assert bool((codes_.abs().amax(dim=1) == 127).all())  # each row uses its full range
    zeros, _ = quantize_rows(torch.zeros(2, 96))
    assert not zeros.any()


def test_int8_weight_only_codes_load_as_the_w8a8_layer():
    """Checkpoints store the int8 layer's qweight and scale: finish_loading turns such layers
    into W8A8 ones over the same tensors (no torch.ao)."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=False)
    weight_only = QuantLinear.from_linear(linear, 8, 0)
    w8a8 = DynamicInt8Linear.of(weight_only)
    assert set(w8a8.state_dict()) == {"qweight", "scale"}
    assert torch.equal(w8a8.qweight, weight_only.qweight) and torch.equal(w8a8.scale, weight_only.scale)
    assert torch.equal(w8a8.dequantize(), DynamicInt8Linear.from_linear(linear).dequantize())
    assert DynamicInt8Linear.of(w8a8) is w8a8
    with pytest.raises(TypeError, match="int8 codes"):
        DynamicInt8Linear.of(QuantLinear.from_linear(linear, 4, 16))
