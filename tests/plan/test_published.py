"""The planner against published measured runs (dist_llm/plan/published.py, docs/scaling.md)."""

import pytest

from dist_llm.plan.memory import Layout, parameter_count
from dist_llm.plan.published import RUNS, predict
from dist_llm.plan.speed import GPUS, step_time


def _id(run):
    return f"{run.name}-{run.gpus}x{run.gpu}-seq{run.seq_len}".replace(" ", "_")


@pytest.mark.parametrize("run", RUNS, ids=_id)
def test_each_row_is_transcribed_consistently(run):
    # The MFU a source publishes follows from the tokens/s per GPU it publishes, by PaLM's count
    # over our parameter count of its shape: checks the shape, the FLOP convention and the figures.
    m = run.model
    flops = 6 * parameter_count(m) + 12 * m.n_layers * m.n_heads * m.head_size * run.seq_len
    assert run.tokens_per_gpu_s * flops / (GPUS[run.gpu].peak_tflops * 1e12) == pytest.approx(
        run.mfu, rel=0.01
    )


@pytest.mark.parametrize("run", RUNS, ids=_id)
def test_predicted_mfu_is_within_15_percent_of_the_published_run(run):
    predicted = predict(run)
    assert predicted["mfu"] == pytest.approx(run.mfu, rel=0.15)
    assert predicted["tokens_per_s"] / run.gpus == pytest.approx(run.tokens_per_gpu_s, rel=0.15)


def test_the_step_is_the_sum_of_its_parts():
    run = RUNS[0]
    t = predict(run)
    parts = ("matmul_s", "attention_s", "elementwise_s")
    assert sum(t[k] for k in parts) == pytest.approx(t["compute_s"])
    rest = ("bubble_s", "optimizer_s", "dp_comm_s", "tp_comm_s", "pp_comm_s", "cp_comm_s")
    assert t["compute_s"] + sum(t[k] for k in rest) == pytest.approx(t["seconds"])


def test_zero3_traffic_is_per_micro_batch_and_crosses_nodes_one_ring_per_nic():
    m = RUNS[0].model
    gpu = GPUS["h100"]
    n = parameter_count(m)
    one, four = (
        step_time(m, Layout(dp=64, zero=3, micro_batch=1, seq_len=2048), 64 * k, gpu, reduce_bytes=4)[
            "dp_comm_s"
        ]
        for k in (1, 4)
    )
    assert four == pytest.approx(4 * one)
    # (2 + 2 + 4) bytes per parameter, 63/64 of it, over 8 NICs x 50 GB/s (at most NVLink's 450)
    assert one == pytest.approx(8 * n * 63 / 64 / (min(450, 8 * 50) * 1e9))
