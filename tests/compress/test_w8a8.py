"""int8-dynamic (W8A8) export: compressed-tensors "int-quantized" that transformers loads.

transformers (with compressed-tensors) loads the folder on CPU as plain nn.Linear layers with our
dequantized weights, and a forward that fake-quantizes each linear's input per token (quantize,
then dequantize, in float). Its rule for the scale is max|x_row| / 127.5 with codes in
[-128, 127]; ours (and vLLM's int8 kernel's) is max|x_row| / 127 in [-127, 127]. So what is
compared: the weights exactly; each linear's output against that fake quantization computed here
from our weights (float rounding); the whole model with transformers' activation quantization
switched off against ours with dequantized weights and fp32 activations (1e-4, as for the
weight-only exports); and the whole model as transformers runs it against our W8A8 logits (the two
scale rules apart: within 2% of the largest logit).
"""

import json

import torch

from dist_llm.checkpoint import load_model, save_weights_only
from dist_llm.compress.quantize import quantize_model
from dist_llm.interop.hf import export_hf
from dist_llm.model.quantized import DynamicInt8Linear

from .test_prune import tiny

SPEC = {"method": "int8-dynamic", "group_size": 0}


def transformers_fake_quant(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' dynamic per-token int8 QDQ of the input, then the dense matmul."""
    scale = x.abs().amax(dim=-1, keepdim=True) / 127.5
    return (torch.round(x / scale).clamp(-128, 127) * scale) @ weight.T


def test_w8a8_export_loads_in_transformers(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    net, config, _ = tiny(tmp_path, tokenizer_dir)
    quantize_model(net, "int8-dynamic", 0)
    ckpt = save_weights_only(
        tmp_path / "q", net.state_dict(), config, tokenizer_dir, extra_meta={"quantization": SPEC}
    )
    export_hf(ckpt, tmp_path / "hf")
    quantization = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert quantization["format"] == "int-quantized"
    scheme = quantization["config_groups"]["group_0"]
    assert scheme["weights"] == {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "dynamic": False,
        "strategy": "channel",
    }
    assert scheme["input_activations"] == {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "dynamic": True,
        "strategy": "token",
    }
    ours, _, tok = load_model(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("To be, or not to be, that is the question").ids])
    with torch.no_grad():
        theirs = hf(ids).logits  # the first forward finishes transformers' decompression
        w8a8 = ours(ids)
    # The weights: exactly our dequantized codes, on every linear.
    pairs = [
        (ours.layers[i].attention.wq, hf.model.layers[i].self_attn.q_proj) for i in range(len(ours.layers))
    ] + [(ours.layers[1].feed_forward.w2, hf.model.layers[1].mlp.down_proj)]
    for q, linear in pairs:
        assert isinstance(q, DynamicInt8Linear)
        assert torch.equal(linear.weight, q.dequantize())
    # Each linear's activations: per token, dynamic, as the scheme says.
    torch.manual_seed(0)
    for q, linear in pairs:
        x = torch.randn(2, 5, q.in_features)
        x[..., 3] *= 20
        with torch.no_grad():
            expected = transformers_fake_quant(x, q.dequantize())
            assert (linear(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
    # Whole model, activation quantization off: our dequantized weights in fp32.
    for module in hf.modules():
        if hasattr(module, "quantization_scheme"):
            module.quantization_enabled = False
    with torch.no_grad():
        dense = hf(ids).logits
        for module in ours.modules():
            if isinstance(module, DynamicInt8Linear):
                module.forward = lambda x, m=module: x @ m.dequantize().T
        dequantized = ours(ids)
    assert (dense - dequantized).abs().max() <= 1e-4 * dequantized.abs().max()
    # Whole model as transformers runs it against ours: the same scheme but the scale rules
    # (measured 0.8% of the largest logit; fp32 activations are 0.6% from ours).
    assert (theirs - w8a8).abs().max() <= 0.02 * w8a8.abs().max()
