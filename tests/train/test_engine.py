"""The optimizer kernel: fused AdamW where torch has one, resuming bitwise, the same algorithm as
torch's per-parameter loop. (Bitwise resume through DeepSpeed itself, with this kernel:
tests/train/test_train_cli.py::test_exact_resume_from_a_checkpoint.)"""

import copy

import torch

from dist_llm.config import ModelConfig
from dist_llm.model.llama import Llama, lm_loss
from dist_llm.train.engine import adamw_kernel, param_groups

CPU = torch.device("cpu")
CONFIG = ModelConfig(
    vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=16
)


def rows(n: int):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 97, (2, 17), generator=g) for _ in range(n)]


def optimizer(model, kernel: str):
    return torch.optim.AdamW(param_groups(model, 0.1), lr=3e-3, **adamw_kernel(kernel, CPU))


def train(model, opt, data) -> None:
    for row in data:
        loss = lm_loss(model(row[:, :-1]), row[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def test_auto_is_fused_where_torch_has_a_fused_kernel_for_the_device():
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    assert adamw_kernel("auto", CPU) == (
        {"fused": True} if "cpu" in _get_fused_kernels_supported_devices() else {"foreach": True}
    )
    assert adamw_kernel("auto", torch.device("cuda", 0)) == {"fused": True}
    assert optimizer(Llama(CONFIG), "auto").defaults["fused"] is (
        "cpu" in _get_fused_kernels_supported_devices()
    )


def test_fused_adamw_resumes_bitwise_and_is_the_loops_algorithm():
    data = rows(4)
    straight = Llama(CONFIG, seed=1)
    opt = optimizer(straight, "fused")
    train(straight, opt, data)

    first = Llama(CONFIG, seed=1)
    opt1 = optimizer(first, "fused")
    train(first, opt1, data[:2])
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt1.state_dict())
    resumed = Llama(CONFIG, seed=2)  # other weights: everything must come from the saved states
    resumed.load_state_dict(saved_model)
    opt2 = optimizer(resumed, "fused")
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, data[2:])
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name

    loop = Llama(CONFIG, seed=1)
    train(loop, optimizer(loop, "for-loop"), data)
    worst = max(
        (a - b).abs().max().item() for a, b in zip(straight.parameters(), loop.parameters(), strict=True)
    )
    assert worst < 1e-5  # another kernel (need not be bitwise the same), the same update
