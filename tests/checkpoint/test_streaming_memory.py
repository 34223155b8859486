"""Consolidation and export-hf hold about one tensor at a time. A process that streams a 206 MB
model (138 tensors, the largest 8 MB) peaks well under a third of the model above a process
that only imports the same modules and reads the checkpoint's metadata; one that loads the
model whole, measured the same way, peaks above the whole model (so the measure can tell)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from dist_llm.checkpoint import SHARDS, sharded, write_meta
from dist_llm.config import Config, ModelConfig
from dist_llm.model.llama import Llama

from ..launch_util import REPO, job_env

# 15 layers of d=512 and a 4096-token vocabulary, untied: 51M parameters (206 MB) in 138 tensors.
MODEL = ModelConfig(
    vocab_size=4096, dim=512, n_layers=15, n_heads=8, n_kv_heads=4, ffn_hidden=1536, max_seq_len=64
)

CHILD = """
import sys

from dist_llm.checkpoint import load_weights, read_meta, saved_config, weight_specs
from dist_llm.checkpoint.consolidate import consolidate
from dist_llm.interop.hf import export_hf

mode, source, out = sys.argv[1:]
read_meta(source)
config = saved_config(source)
weight_specs(source)
if mode == "consolidate":
    consolidate(source, out)
elif mode == "export-hf":
    export_hf(source, out)
elif mode == "whole":
    load_weights(source, config.model)
# The peak resident memory of this process's own address space. Not ru_maxrss: Linux carries
# the forking parent's resident size across exec into it (every child would read as pytest).
with open("/proc/self/status") as status:
    print(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")))
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A sharded checkpoint of MODEL (the weights only: nothing here reads moments), written in
    one process, each tensor one piece; removed afterwards (about 0.8 GB with the outputs)."""
    folder = tmp_path_factory.mktemp("big")
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Llama(MODEL).named_parameters()}
    g = torch.Generator().manual_seed(0)
    pieces = {}
    for name, shape in shapes.items():
        tensor = torch.randn(shape, generator=g)
        pieces[f"model/{name}"] = sharded.Sharded(shape, [sharded.Piece((0,) * len(shape), tensor)])
    ckpt = folder / "step_000000001"
    sharded.save(ckpt / SHARDS, pieces)
    write_meta(ckpt, Config(model=MODEL), None, step=1, tokens=64, world_size=1)
    sizes = [t.numel() * t.element_size() for s in pieces.values() for t in (s.pieces[0].tensor,)]
    del pieces
    yield ckpt, sum(sizes), max(sizes), len(sizes)
    shutil.rmtree(folder)


def peak(mode: str, source, out="-") -> int:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(source), str(out)],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1])


def test_consolidate_and_export_hold_about_one_tensor(big):
    ckpt, model_bytes, largest, count = big
    assert count == 138 and 200e6 < model_bytes < 300e6 and largest < model_bytes / 20
    baseline = peak("baseline", ckpt)
    consolidated = ckpt.parent / "consolidated"
    growth = {
        "consolidate": peak("consolidate", ckpt, consolidated) - baseline,
        "export-hf from shards": peak("export-hf", ckpt, ckpt.parent / "hf") - baseline,
        "export-hf from weights-only": peak("export-hf", consolidated, ckpt.parent / "hf2") - baseline,
        "load_weights (whole)": peak("whole", ckpt) - baseline,
    }
    report = {k: f"{v / 1e6:.0f} MB" for k, v in growth.items()}
    print(
        json.dumps(
            {"model": f"{model_bytes / 1e6:.0f} MB", "largest tensor": f"{largest / 1e6:.0f} MB"} | report
        )
    )
    for what in ("consolidate", "export-hf from shards", "export-hf from weights-only"):
        assert growth[what] < model_bytes / 3, report
    assert growth["load_weights (whole)"] > model_bytes, report
    assert (ckpt.parent / "hf" / "model.safetensors").stat().st_size > model_bytes
