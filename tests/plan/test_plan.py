"""The planner against published figures and against the instantiated models."""

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch

from dist_llm.cli import main
from dist_llm.config import load_config
from dist_llm.model.llama import Llama, num_params
from dist_llm.plan.memory import GB, Layout, activation_bytes_per_layer, model_state_bytes, parameter_count
from dist_llm.plan.speed import GPUS, context_bytes_per_layer, enumerate_layouts, step_time

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(("stage", "expected_gb"), [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_worked_example(stage, expected_gb):
    # Rajbhandari et al. 2020, figure 1: 7.5B parameters, 64 data-parallel GPUs, K = 12.
    total = sum(model_state_bytes(7.5e9, 64, stage, "bf16", k=12).values()) / GB
    assert total == pytest.approx(expected_gb, abs=0.05)


@pytest.mark.parametrize("preset", sorted(p.name for p in (CONFIGS / "model").glob("*.yaml")))
def test_parameter_count_equals_the_instantiated_model(preset):
    model_config = load_config(CONFIGS / "model" / preset).model
    with torch.device("meta"):
        model = Llama(model_config)
    assert parameter_count(model_config) == num_params(model)


def test_pipeline_bubble_is_p_minus_1_over_m():
    m = load_config(CONFIGS / "model" / "7b.yaml").model
    layout = Layout(tp=1, pp=4, dp=2, zero=1, micro_batch=2, seq_len=2048)
    t = step_time(m, layout, global_batch=32, gpu=GPUS["h100"])
    assert t["micro_batches"] == 8
    assert t["bubble_s"] / t["compute_s"] == pytest.approx(3 / 8)


def test_activation_rules():
    m = load_config(CONFIGS / "model" / "7b.yaml").model
    base = Layout(tp=4, micro_batch=1, seq_len=4096)
    full = activation_bytes_per_layer(m, Layout(**{**base.__dict__, "recompute": True}))
    assert full == 2 * 4096 * 4096
    sp = activation_bytes_per_layer(m, Layout(**{**base.__dict__, "sequence_parallel": True}))
    assert full < sp < activation_bytes_per_layer(m, base)
    assert activation_bytes_per_layer(m, base, flash=False) > activation_bytes_per_layer(m, base)


def test_context_parallelism_divides_activations_and_adds_all_to_alls():
    m = load_config(CONFIGS / "model" / "7b.yaml").model  # 32 heads, 32 key/value heads, d 4096
    base = Layout(micro_batch=1, seq_len=32768)
    cp4 = Layout(**{**base.__dict__, "cp": 4, "dp": 1})
    for flash in (True, False):
        one, four = (activation_bytes_per_layer(m, x, flash) for x in (base, cp4))
        assert four == pytest.approx(one / 4)
    # q, k, v, out: 4 x [1, 8192, 4096] 16-bit per layer forward, as much backward, 3/4 of it sent
    assert context_bytes_per_layer(m, cp4) == 2 * 4 * 8192 * 4096 * 2 * 3 / 4
    # 2 key/value heads copied to one per context rank: k and v sent at 4 heads' width, not 2
    gqa = dataclasses.replace(m, n_kv_heads=2)
    assert context_bytes_per_layer(gqa, cp4) == 2 * (2 * 32 + 2 * 4) * 128 * 8192 * 2 * 3 / 4
    assert step_time(m, cp4, global_batch=4, gpu=GPUS["h100"])["cp_comm_s"] > 0
    rows = enumerate_layouts(m, 8, 8, 32768, GPUS["h100"])
    assert {r["cp"] for r in rows} == {1, 2, 4, 8} and all(r["pp"] == 1 for r in rows if r["cp"] > 1)


def test_plan_command(capsys):
    assert (
        main(
            [
                "plan",
                "--config",
                str(CONFIGS / "model" / "7b.yaml"),
                "--gpus",
                "64",
                "--json",
                "--top",
                "5",
                "data.seq_len=4096",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5 and rows[0]["fits"] and rows[0]["tp"] * rows[0]["pp"] * rows[0]["dp"] == 64
    assert all(a["tokens_per_s"] >= b["tokens_per_s"] for a, b in itertools.pairwise(rows))
    assert (
        main(["plan", "--config", str(CONFIGS / "model" / "70b.yaml"), "--gpus", "8", "--gpu", "a100"]) == 0
    )
    out = capsys.readouterr().out
    assert "0 fit" in out and " NO" in out  # 70B does not fit on one node of A100s


def test_train_warns_when_the_plan_does_not_fit():
    from dist_llm.plan.memory import fit_warning

    config = load_config(CONFIGS / "model" / "7b.yaml", ["data.seq_len=4096", "train.micro_batch_size=1"])
    message = fit_warning(config, world_size=8, device_bytes=80 * GB)  # ZeRO-1 over 8 GPUs: ~40 GB of states
    assert message is None
    message = fit_warning(
        config, world_size=1, device_bytes=80 * GB
    )  # one GPU: 7B x 16 bytes alone is 108 GB
    assert message and "exceeds the device's 80.0 GB" in message and "optimizer" in message


def test_mixture_of_experts_counts_active_and_total_parameters_and_expert_traffic():
    """Mixtral 8x7B: 46,702,792,704 parameters (the Hugging Face checkpoint's count), 12.9B
    active per token (Jiang et al. 2024); compute counts the active ones."""
    from dist_llm.plan.memory import active_parameter_count, expert_count, memory_per_gpu
    from dist_llm.plan.speed import expert_bytes_per_layer

    m = load_config(CONFIGS / "model" / "mixtral-8x7b.yaml").model
    assert parameter_count(m) == 46_702_792_704
    assert active_parameter_count(m) == 46_702_792_704 - 32 * 6 * 3 * 4096 * 14336
    assert round(active_parameter_count(m) / 1e9, 1) == 12.9
    # Expert parallelism keeps 1/8 of the experts per rank; ZeRO-1 then partitions them and the
    # dense weights over the 16 / 8 = 2 ranks holding the same experts.
    one, eight = (memory_per_gpu(m, Layout(dp=16, ep=e, zero=1, seq_len=4096)) for e in (1, 8))
    dense = parameter_count(m) - expert_count(m)
    assert eight["parameters"] == 2 * (dense + expert_count(m) / 8)
    assert eight["optimizer"] == 12 * (dense + expert_count(m) / 8) / 2
    assert one["optimizer"] == 12 * parameter_count(m) / 16
    # per MoE layer and micro-batch: 2 rows of 4096 per token out and back, forward and
    # backward, 16-bit, 7/8 of them to other ranks
    layout = Layout(dp=16, ep=8, micro_batch=1, seq_len=4096)
    assert expert_bytes_per_layer(m, layout) == 4096 * 2 * 4096 * 2 * 2 * 2 * 7 / 8
    t = step_time(m, layout, global_batch=64, gpu=GPUS["h100"])
    # compute counts the active parameters: matmuls at the H100's GEMM efficiency for d = 4096
    # (the input embedding is a lookup, not a matmul)
    gemm = 0.72 * 4096 / (4096 + 512)
    matmul = 64 * 4096 * 6 * (active_parameter_count(m) - m.vocab_size * m.dim) / (16 * 989e12 * gemm)
    assert t["ep_comm_s"] > 0 and t["matmul_s"] == pytest.approx(matmul)
    rows = enumerate_layouts(m, 16, 64, 4096, GPUS["h100"])
    assert {(r["tp"], r["pp"], r["cp"]) for r in rows} == {(1, 1, 1)}  # MoE: data and expert parallel
    assert {r["ep"] for r in rows} == {1, 2, 4, 8} and all(r["zero"] < 3 for r in rows)
