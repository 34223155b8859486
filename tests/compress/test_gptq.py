"""GPTQ: the blocked Cholesky implementation against an unblocked reference of the paper's
algorithm written here (explicit inverse Hessian, updated by Gaussian elimination after each
column, eq. 3 of Frantar et al.), its layer-wise error against round-to-nearest's, and the
sequential model pass (later linears calibrated on the quantized earlier ones)."""

import copy

import pytest
import torch

from dist_llm.compress.gptq import block_inputs, dequantize, gptq, gptq_model
from dist_llm.model.quantized import QuantLinear, use_packed_kernels


def correlated_inputs(n: int, width: int, seed: int = 0) -> torch.Tensor:
    """Rows of correlated features with a few outlier channels, as a transformer's are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width**0.5 + torch.eye(width)
    outliers = 1 + 5 * (torch.rand(width, generator=g) < 0.05)
    return (torch.randn(n, width, generator=g) @ mix) * outliers


def reference_gptq(w, h, bits, group_size, damp, order):
    """The OBS update column by column in `order`, with no Cholesky and no blocks: quantize
    column i, move the others by -err / [H^-1]_ii * [H^-1]_i,: and remove i from H^-1.
    int4 scales: absmax / 7 of the group's current weights when its first column comes up (in
    input order); with a permuted order, of the unquantized weights."""
    w, hinv = w.double().clone(), h.double().clone()
    n_in = w.shape[1]
    hinv = torch.linalg.inv(hinv + damp * hinv.diagonal().mean() * torch.eye(n_in, dtype=hinv.dtype))
    group = group_size or n_in
    levels, low, high = (127, -127, 127) if bits == 8 else (7, -8, 7)
    in_order = torch.equal(order, torch.arange(n_in))
    scales = torch.stack([g.abs().amax(dim=1) / levels for g in w.split(group, dim=1)], dim=1)
    codes = torch.zeros_like(w)
    for i in order.tolist():
        if in_order and i % group == 0:
            scales[:, i // group] = w[:, i : i + group].abs().amax(dim=1) / levels
        s = scales[:, i // group]
        codes[:, i] = torch.round(w[:, i] / s).clamp(low, high)
        err = (w[:, i] - codes[:, i] * s) / hinv[i, i]
        w -= err[:, None] * hinv[i][None, :]
        hinv -= hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return codes, scales


def rtn(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.clone()
    return QuantLinear.from_linear(linear, bits, group_size).dequantize()


CASES = [(4, 32, False), (4, 64, False), (8, 0, False), (4, 32, True), (8, 0, True)]


@pytest.mark.parametrize("bits,group,act_order", CASES)
def test_blocked_gptq_is_the_papers_algorithm(bits, group, act_order):
    torch.manual_seed(0)
    x = correlated_inputs(512, 160)
    w = torch.randn(24, 160) * 0.02
    h = 2 * x.double().T @ x.double() / x.shape[0]
    # block_size 64 < width: the lazy block updates between blocks are exercised too
    codes, scales = gptq(w, h, bits, group, damp=0.01, act_order=act_order, block_size=64)
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(160)
    ref_codes, ref_scales = reference_gptq(w, h, bits, group, 0.01, order)
    assert torch.equal(codes, ref_codes.float())
    assert torch.allclose(scales.double(), ref_scales, rtol=1e-6)
    assert codes.min() >= (-127 if bits == 8 else -8) and codes.max() <= (127 if bits == 8 else 7)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 0)])
def test_layerwise_error_is_below_round_to_nearest(bits, group):
    x = correlated_inputs(2048, 256, seed=1)
    w = torch.randn(48, 256) * 0.02
    h = 2 * x.double().T @ x.double() / x.shape[0]
    ours = dequantize(*gptq(w, h, bits, group))
    exact = x @ w.T
    gptq_error = (x @ ours.T - exact).norm()
    rtn_error = (x @ rtn(w, bits, group).T - exact).norm()
    assert gptq_error < 0.9 * rtn_error, (gptq_error, rtn_error)


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
        codes, scales = gptq(original[f"layers.{layer}.{name}.weight"], h, 4, 32)
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
    }
    assert read_meta(tmp_path / "smooth")["quantization"]["smoothquant"] == 0.5
    capsys.readouterr()
    for options, message in (
        (["--method", "int4", "--smoothquant", "0.5"], "error: --smoothquant is for int8 activations"),
        (["--method", "int4", "--act-order"], "error: --act-order is a GPTQ option: add --algorithm gptq"),
        (["--method", "int8", "--algorithm", "gptq", "--damp", "0"], "error: --damp 0.0 must be in (0, 1)"),
        (["--method", "int8-dynamic", "--smoothquant", "1.5"], "error: --smoothquant 1.5 must be in (0, 1]"),
    ):
        assert main(["quantize", *common, "--out", str(tmp_path / "bad"), *options]) == 2
        assert capsys.readouterr().err.startswith(message)
        assert not (tmp_path / "bad").exists()
