"""export-gguf against transformers' GGUF loader: a tiny model's logits from the F16, Q8_0 and
Q4_0 files, llama.cpp's tensor names and types, the tokenizer, and --out kept as every stage
keeps it (somebody else's folder never replaced, its own only with --overwrite)."""

from copy import deepcopy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dist_llm.checkpoint import save_weights_only
from dist_llm.cli import main
from dist_llm.data.tokenizer import load_tokenizer
from dist_llm.interop.gguf import GGUF_FILE, tensor_names
from dist_llm.model.llama import Llama

from ..checkpoint.builders import tiny_config
from ..output_util import snapshot, staging_left, unrelated_folder

# transformers' logits against ours, relative to their spread: measured 1.1e-3 from F16 weights;
# from Q8_0 and Q4_0 3e-2 and 0.26 against the unquantized model (q and k scaled up make the
# attention sensitive), so those are held to our model with the same weights through gguf-py's
# dequantize, where only the F16 round trip of the norms and the arithmetic differ.
TOLERANCE = 0.005


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer_dir):
    """A tied 2-layer model with grouped KV heads whose attention is sharp (q and k scaled up),
    so that a q/k layout the rotary kernel does not expect changes the logits (by ~0.8x)."""
    config = tiny_config(tied=True)
    torch.manual_seed(0)
    model = Llama(config.model).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.mul_(20)
            layer.attention.wk.weight.mul_(20)
    ckpt = save_weights_only(
        tmp_path_factory.mktemp("gguf") / "ckpt", model.state_dict(), config, tokenizer_dir
    )
    return model, ckpt


def export(ckpt, out, *extra) -> int:
    return main(["export-gguf", "--checkpoint", str(ckpt), "--out", str(out), *extra])


@pytest.mark.parametrize("outtype", ["f16", "q8_0", "q4_0"])
def test_transformers_loads_the_export_with_our_logits(outtype, tiny_model, tmp_path):
    model, ckpt = tiny_model
    assert export(ckpt, tmp_path / "out", "--outtype", outtype) == 0
    types = dict(tensor_names(tmp_path / "out" / GGUF_FILE))
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["blk.1.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[outtype]
    assert types["token_embd.weight"] == ("F16" if outtype == "f16" else "Q8_0")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=GGUF_FILE, dtype=torch.float32)
    tokens = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = with_gguf_weights(model, outtype)(tokens), hf.eval()(tokens).logits
    spread = (ours - ours.mean(-1, keepdim=True)).norm()
    assert (theirs - ours).norm() <= TOLERANCE * spread


def with_gguf_weights(model, outtype):
    """A copy of `model` whose matrices went through the file's quantization and back (rows
    quantize independently, so llama.cpp's q/k row permutation does not change them)."""
    from gguf import GGMLQuantizationType, quants

    copy = deepcopy(model)
    for name, weight in copy.named_parameters():
        if weight.ndim == 2 and outtype != "f16":
            kind = "Q4_0" if outtype == "q4_0" and name.startswith("layers.") else "Q8_0"
            packed = quants.quantize(weight.detach().numpy(), GGMLQuantizationType[kind])
            weight.data = torch.from_numpy(quants.dequantize(packed, GGMLQuantizationType[kind]))
    return copy


def test_the_tokenizer_travels_in_the_file(tiny_model, tokenizer_dir, tmp_path):
    _, ckpt = tiny_model
    assert export(ckpt, tmp_path / "out") == 0
    theirs = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file=GGUF_FILE)
    ours = load_tokenizer(tokenizer_dir)
    text = "Now is the winter of our discontent\n  Made glorious summer: café, ½"
    ids = ours.encode(text).ids
    assert theirs.encode(text, add_special_tokens=False) == ids and theirs.decode(ids) == text
    eos = ours.token_to_id("<|endoftext|>")
    assert theirs.encode("<|endoftext|>", add_special_tokens=False) == [eos]  # whole, as a control token
    assert theirs.eos_token == "<|endoftext|>" and theirs.pad_token == "<|pad|>"


def test_out_is_replaced_only_when_it_is_our_own_export(tiny_model, tmp_path, capsys):
    _, ckpt = tiny_model
    victim = unrelated_folder(tmp_path / "victim")
    before = snapshot(victim)
    for extra in ([], ["--overwrite"]):
        assert export(ckpt, victim, *extra) == 2
        assert "exists and is not a GGUF export" in capsys.readouterr().err
    assert snapshot(victim) == before and staging_left(victim) == []
    out = tmp_path / "out"
    assert export(ckpt, out) == 0
    first = snapshot(out)
    assert export(ckpt, out, "--outtype", "q8_0") == 2  # ours, but no --overwrite
    assert "pass --overwrite" in capsys.readouterr().err and snapshot(out) == first
    assert export(ckpt, out, "--outtype", "q8_0", "--overwrite") == 0
    assert snapshot(out) != first and list(snapshot(out)) == [GGUF_FILE] and staging_left(out) == []
