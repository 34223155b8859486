"""GPTQ: the blocked Cholesky implementation against an unblocked reference of the paper's
algorithm written here (explicit inverse Hessian, updated by Gaussian elimination after each
column, eq. 3 of Frantar et al.), its layer-wise error against round-to-nearest's, and the
sequential model pass (later linears calibrated on the quantized earlier ones)."""

import copy

import pytest
import torch

from dist_llm.compress.gptq import block_inputs, dequantize, gptq, gptq_model
from dist_llm.model.quantized import QuantLinear, int4_codes, int4_params, int4_values, use_packed_kernels


def correlated_inputs(n: int, width: int, seed: int = 0) -> torch.Tensor:
    """Rows of correlated features with a few outlier channels, as a transformer's are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width**0.5 + torch.eye(width)
    outliers = 1 + 5 * (torch.rand(width, generator=g) < 0.05)
    return (torch.randn(n, width, generator=g) @ mix) * outliers


def reference_gptq(w, h, bits, group_size, damp, order, symmetric=True, mse=False):
    """The OBS update column by column in `order`, with no Cholesky and no blocks: quantize
    column i, move the others by -err / [H^-1]_ii * [H^-1]_i,: and remove i from H^-1.
    int4 grids (round-to-nearest's, int4_params: absmax / 7, or min/max with zero points,
    optionally clipped) of the group's current weights when its first column comes up (in
    input order); with a permuted order, of the unquantized weights."""
    w, hinv = w.double().clone(), h.double().clone()
    n_in = w.shape[1]
    hinv = torch.linalg.inv(hinv + damp * hinv.diagonal().mean() * torch.eye(n_in, dtype=hinv.dtype))
    group = group_size or n_in
    in_order = torch.equal(order, torch.arange(n_in))

    def grid(g):
        if bits == 8:
            return g.abs().amax(dim=1) / 127, torch.zeros(g.shape[0], dtype=g.dtype)
        scale, zero = int4_params(g, symmetric, mse)
        return scale, torch.zeros_like(scale) if zero is None else zero

    grids = [grid(g) for g in w.split(group, dim=1)]
    scales = torch.stack([s for s, _ in grids], dim=1)
    zeros = torch.stack([z for _, z in grids], dim=1)
    codes = torch.zeros_like(w)
    for i in order.tolist():
        if in_order and i % group == 0:
            scales[:, i // group], zeros[:, i // group] = grid(w[:, i : i + group])
        s, z = scales[:, i // group], zeros[:, i // group]
        if bits == 8:
            codes[:, i] = torch.round(w[:, i] / s).clamp(-127, 127)
        else:
            codes[:, i] = int4_codes(w[:, i], s, None if symmetric else z)
        err = (w[:, i] - (codes[:, i] - z) * s) / hinv[i, i]
        w -= err[:, None] * hinv[i][None, :]
        hinv -= hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return codes, scales, zeros


def rtn(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True, mse: bool = False
) -> torch.Tensor:
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.clone()
    return QuantLinear.from_linear(linear, bits, group_size, symmetric, mse).dequantize()


# (bits, group, act_order, symmetric, mse): int4 also with zero points (symmetric False) and
# clipped ranges (mse), in input order and with act-order; int8 is symmetric per channel.
CASES = [(4, 32, False, True, False), (4, 64, False, True, False), (8, 0, False, True, False)]
CASES += [(4, 32, True, True, False), (8, 0, True, True, False)]
CASES += [
    (4, 32, ao, sym, mse)
    for ao in (False, True)
    for sym, mse in ((False, False), (False, True), (True, True))
]


@pytest.mark.parametrize("bits,group,act_order,symmetric,mse", CASES)
def test_blocked_gptq_is_the_papers_algorithm(bits, group, act_order, symmetric, mse):
    torch.manual_seed(0)
    x = correlated_inputs(512, 160)
    w = torch.randn(24, 160) * 0.02
    h = 2 * x.double().T @ x.double() / x.shape[0]
    # block_size 64 < width: the lazy block updates between blocks are exercised too
    codes, scales, zeros = gptq(
        w, h, bits, group, damp=0.01, act_order=act_order, block_size=64, symmetric=symmetric, mse=mse
    )
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(160)
    ref_codes, ref_scales, ref_zeros = reference_gptq(w, h, bits, group, 0.01, order, symmetric, mse)
    assert torch.equal(codes, ref_codes.float())
    assert torch.allclose(scales.double(), ref_scales, rtol=1e-6)
    if symmetric:
        assert zeros is None
        assert codes.min() >= (-127 if bits == 8 else -8) and codes.max() <= (127 if bits == 8 else 7)
    else:
        assert torch.equal(zeros.double(), ref_zeros)
        assert codes.min() >= 0 and codes.max() <= 15 and zeros.min() >= 0 and zeros.max() <= 15


@pytest.mark.parametrize(
    "bits,group,symmetric", [(4, 32, True), (4, 128, True), (8, 0, True), (4, 32, False), (4, 128, False)]
)
def test_layerwise_error_is_below_round_to_nearest(bits, group, symmetric):
    x = correlated_inputs(2048, 256, seed=1)
    w = torch.randn(48, 256) * 0.02
    h = 2 * x.double().T @ x.double() / x.shape[0]
    ours = dequantize(*gptq(w, h, bits, group, symmetric=symmetric))
    exact = x @ w.T
    gptq_error = (x @ ours.T - exact).norm()
    rtn_error = (x @ rtn(w, bits, group, symmetric).T - exact).norm()
    assert gptq_error < 0.9 * rtn_error, (gptq_error, rtn_error)


def test_asymmetric_codes_dequantize_as_the_layer_does():
    """gptq's (codes, scales, zeros) are the QuantLinear's: same weights, same kernel output."""
    x = correlated_inputs(512, 128, seed=2)
    w = torch.randn(32, 128) * 0.02
    h = 2 * x.double().T @ x.double() / x.shape[0]
    codes, scales, zeros = gptq(w, h, 4, 64, symmetric=False, mse=True)
    q = QuantLinear.from_codes(codes, scales, 4, 64, zeros)
    assert torch.equal(q.dequantize(), dequantize(codes, scales, zeros))
    groups = codes.unflatten(-1, (-1, 64))
    assert torch.equal(q.dequantize(), int4_values(groups, scales[..., None], zeros[..., None]).flatten(-2))


def test_model_pass_is_sequential_over_quantized_layers(tmp_path, tokenizer_dir):
    """Each linear's codes are GPTQ's on the inputs it sees with everything before it quantized:
    block 0's first step on the unquantized inputs, block 1's w2 on the outputs of the quantized
    block 0 and block 1's own quantized w1/w3."""
    from .test_prune import tiny

    net, _, _ = tiny(tmp_path, tokenizer_dir, n_layers=2)
    fresh = copy.deepcopy(net)
    original = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [torch.randint(0, 2048, (4, 32)) for _ in range(2)]
    gptq_model(net, batches, bits=4, group_size=32)
    use_packed_kernels(net, False)  # the dequantized weights, as the pass computed with them

    def hessian(module, model):
        rows = []
        handle = module.register_forward_pre_hook(
            lambda m, args: rows.append(args[0].reshape(-1, args[0].shape[-1]))
        )
        with torch.no_grad():
            for b in batches:
                model(b)
        handle.remove()
        x = torch.cat(rows).double()
        return 2 * x.T @ x / x.shape[0]

    for layer, name, model in (
        (0, "attention.wq", fresh),  # inputs from the unquantized model
        (1, "feed_forward.w2", net),  # inputs through the quantized layers
    ):
        q = net.layers[layer].get_submodule(name)
        assert isinstance(q, QuantLinear)
        h = hessian(model.layers[layer].get_submodule(name), model)
        codes, scales, _ = gptq(original[f"layers.{layer}.{name}.weight"], h, 4, 32)
        assert (q.codes().float() == codes).float().mean() > 0.999, name
        assert torch.allclose(q.scale, scales, rtol=1e-5)


def test_block_inputs_are_what_the_first_block_gets(tmp_path, tokenizer_dir):
    from .test_prune import tiny

    net, _, _ = tiny(tmp_path, tokenizer_dir, n_layers=1)
    batch = torch.randint(0, 2048, (2, 16))
    ((args, kwargs),) = block_inputs(net, [batch])
    assert torch.equal(args[0], net.tok_embeddings(batch))
    with torch.no_grad():
        h = net.layers[0](*args, **kwargs)
        assert torch.allclose(net.output(net.norm(h)), net(batch), atol=1e-6)


def test_quantize_command_with_gptq_and_smoothquant(tmp_path, tokenizer_dir, plays, capsys):
    """The CLI options reach the stage, land in the metadata and the report, and a wrong
    combination is one error line naming the option, with nothing written."""
    import json

    from dist_llm.checkpoint import load_model, read_meta
    from dist_llm.cli import main

    from .test_prune import tiny

    _, _, ckpt = tiny(tmp_path, tokenizer_dir, n_layers=1)
    text = tmp_path / "t.txt"
    text.write_text(plays[2].read_text(encoding="utf-8")[:3000], encoding="utf-8")
    common = ["--checkpoint", str(ckpt), "--text", str(text), "--calib-samples", "4", "--calib-seq-len", "32"]
    for out, options in (
        ("gptq", ["--method", "int4", "--group-size", "32", "--algorithm", "gptq", "--act-order"]),
        (
            "asym",
            ["--method", "int4", "--group-size", "32", "--algorithm", "gptq", "--asymmetric", "--mse-clip"],
        ),
        ("smooth", ["--method", "int8-dynamic", "--smoothquant", "0.5"]),
    ):
        assert main(["quantize", *common, "--out", str(tmp_path / out), *options]) == 0
        report = json.loads((tmp_path / out / "report.json").read_text())
        assert report["settings"]["calibration_tokens"] == 4 * 32
        assert load_model(tmp_path / out)[0] is not None
    assert read_meta(tmp_path / "gptq")["quantization"] == {
        "method": "int4",
        "group_size": 32,
        "algorithm": "gptq",
        "symmetric": True,
        "mse_clip": False,
    }
    assert read_meta(tmp_path / "asym")["quantization"] == {
        "method": "int4",
        "group_size": 32,
        "algorithm": "gptq",
        "symmetric": False,
        "mse_clip": True,
    }
    asym = load_model(tmp_path / "asym")[0].layers[0].attention.wq
    assert not asym.symmetric and asym.zero.dtype == torch.uint8 and int(asym.zero.max()) <= 15
    assert read_meta(tmp_path / "smooth")["quantization"]["smoothquant"] == 0.5
    capsys.readouterr()
    for options, message in (
        (["--method", "int4", "--smoothquant", "0.5"], "error: --smoothquant is for int8 activations"),
        (["--method", "int4", "--act-order"], "error: --act-order is a GPTQ option: add --algorithm gptq"),
        (["--method", "int8", "--algorithm", "gptq", "--damp", "0"], "error: --damp 0.0 must be in (0, 1)"),
        (["--method", "int8", "--asymmetric"], "error: --asymmetric is for int4 groups (--method int4)"),
        (["--method", "int8-dynamic", "--mse-clip"], "error: --mse-clip is for int4 groups (--method int4)"),
        (["--method", "int8-dynamic", "--smoothquant", "1.5"], "error: --smoothquant 1.5 must be in (0, 1]"),
    ):
        assert main(["quantize", *common, "--out", str(tmp_path / "bad"), *options]) == 2
        assert capsys.readouterr().err.startswith(message)
        assert not (tmp_path / "bad").exists()
