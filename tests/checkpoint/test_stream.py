"""The hand-written streaming safetensors writer against safetensors itself: the same bytes as
`save_file` for the same tensors, read back by `load_file` and `safe_open`, and every broken
promise of the header (order, shape, dtype, a missing tensor) refused."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dist_llm.checkpoint.stream import DTYPES, order, write_safetensors
from dist_llm.errors import CheckpointError


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {f"{dtype}".removeprefix("torch."): torch.randn(3, 5, generator=g).to(dtype) for dtype in DTYPES}
    out |= {
        "layers.0.w": torch.randn(7, 3, generator=g),
        "a.norm": torch.randn(7, generator=g),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "odd.bf16": torch.randn(3, generator=g).bfloat16(),  # 6 bytes: what follows must stay aligned
        "transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
    }
    return out


def specs_of(ts):
    return {k: (tuple(v.shape), v.dtype) for k, v in ts.items()}


def stream(ts):
    """One tensor at a time, in the file's order."""
    for name in order(specs_of(ts)):
        yield name, ts[name]


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_same_bytes_as_save_file_and_read_back_by_safetensors(tmp_path, metadata):
    ts = tensors()
    write_safetensors(tmp_path / "ours.safetensors", specs_of(ts), stream(ts), metadata)
    save_file({k: v.contiguous() for k, v in ts.items()}, str(tmp_path / "theirs.safetensors"), metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert back.keys() == ts.keys()
    for name, tensor in ts.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        assert f.metadata() == metadata
        assert f.get_slice("layers.0.w").get_shape() == [7, 3]


def test_broken_promises_are_refused(tmp_path):
    ts = {"a": torch.ones(2), "b": torch.ones(3)}
    specs = specs_of(ts)
    path = tmp_path / "x.safetensors"
    with pytest.raises(CheckpointError, match="got tensor 'b' where 'a' was due"):
        write_safetensors(path, specs, [("b", ts["b"]), ("a", ts["a"])])
    with pytest.raises(
        CheckpointError, match=r"'a' is \(2,\) torch.float64, its metadata says \(2,\) torch.float32"
    ):
        write_safetensors(path, specs, [("a", ts["a"].double())])
    with pytest.raises(CheckpointError, match=r"'a' is \(1, 2\)"):
        write_safetensors(path, specs, [("a", ts["a"].view(1, 2))])
    with pytest.raises(CheckpointError, match=r"'b' was never written \(1 of 2\)"):
        write_safetensors(path, specs, [("a", ts["a"])])
    with pytest.raises(CheckpointError, match="got tensor 'c' after the last one"):
        write_safetensors(path, specs, [("a", ts["a"]), ("b", ts["b"]), ("c", ts["b"])])
