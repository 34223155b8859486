"""DPO: the objective against the paper's formula written out on fixed logits, the pairs file
(masks token by token, errors that name file, line and field), and real runs of `dist-llm dpo`
whose held-out chosen-over-rejected reward margin rises: with LoRA (the reference is the base
with its adapters disabled) and with a full frozen reference under ZeRO-3."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dist_llm.checkpoint import load_model
from dist_llm.config import Config, DPOConfig
from dist_llm.data.chat import ChatEncoder
from dist_llm.data.pairs import PairLoader, pair_batch, read_pairs
from dist_llm.data.tokenizer import EOT, load_tokenizer
from dist_llm.errors import InputError
from dist_llm.train.dpo import DPOObjective, sequence_logps
from dist_llm.train.lora import merge

from .tune_util import base_checkpoint, play_lines, result, stage, write_pairs


def _paper_loss(policy, reference, labels, beta, eps, kind="sigmoid"):
    """-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h), h the difference of the
    chosen and rejected log-ratios, every log-probability summed token by token in Python."""

    def logp(logits, row):
        total = 0.0
        for t, label in enumerate(labels[row].tolist()):
            if label != -100:
                z = logits[row, t].double()
                total += float(z[label] - torch.logsumexp(z, 0))
        return total

    half, losses = labels.shape[0] // 2, []
    for i in range(half):
        h = (logp(policy, i) - logp(reference, i)) - (logp(policy, half + i) - logp(reference, half + i))
        if kind == "ipo":  # Azar et al. 2023, eq. 17: (h - 1 / (2 tau))^2
            losses.append((h - 1 / (2 * beta)) ** 2)
            continue
        sig = 1 / (1 + math.exp(-beta * h))
        losses.append(-(1 - eps) * math.log(sig) - eps * math.log(1 - sig))
    return sum(losses) / half


class _FixedReference:
    def __init__(self, logits):
        self.logits = logits

    def __call__(self, input_ids, dtype):
        return self.logits


@pytest.mark.parametrize(("eps", "kind"), [(0.0, "sigmoid"), (0.2, "sigmoid"), (0.0, "ipo")])
def test_dpo_loss_is_the_papers_formula(eps, kind):
    g = torch.Generator().manual_seed(0)
    pairs, seq, vocab = 3, 7, 11
    policy = torch.randn(2 * pairs, seq, vocab, generator=g, requires_grad=True)
    reference = torch.randn(2 * pairs, seq, vocab, generator=g)
    labels = torch.randint(0, vocab, (2 * pairs, seq), generator=g)
    labels[:, :2] = -100  # the prompt
    labels[1, 5:] = -100  # padding after a short response
    config = Config(dpo=DPOConfig(beta=0.5, label_smoothing=eps, loss=kind))
    objective = DPOObjective(config, _FixedReference(reference))
    loss = objective(policy, {"input_ids": labels.clamp(min=0), "labels": labels})
    expected = _paper_loss(policy.detach(), reference, labels, 0.5, eps, kind)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()  # gradients reach the policy's logits only through scored positions
    assert policy.grad[:, :2].abs().max() == 0 and policy.grad[1, 5:].abs().max() == 0
    assert objective.pairs == pairs


def test_pairs_are_masked_on_the_responses(tmp_path, tokenizer_dir):
    path = tmp_path / "pairs.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote it?"}]
    records = [
        {"prompt": "Speak:", "chosen": "Now, fair Hippolyta", "rejected": "NOW"},
        {"prompt": chat, "chosen": "A player.", "rejected": "No one."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    pairs = read_pairs(path, tokenizer_dir, seq_len=48)
    tokenizer = load_tokenizer(tokenizer_dir)
    prompt, chosen = tokenizer.encode("Speak:").ids, tokenizer.encode("Now, fair Hippolyta").ids
    eot = tokenizer.token_to_id(EOT)
    row = pairs.tokens[0, 0].tolist()
    assert row[: len(prompt) + len(chosen) + 1] == [*prompt, *chosen, eot]
    scored = [t for t, m in zip(row, pairs.mask[0, 0].tolist(), strict=True) if m]
    assert scored == [*chosen, eot]
    ids, mask = ChatEncoder(tokenizer_dir).encode_chat(
        [("system", "Be brief."), ("user", "Who wrote it?"), ("assistant", "No one.")]
    )
    assert pairs.tokens[1, 1, : len(ids)].tolist() == ids
    assert pairs.mask[1, 1, : len(ids)].tolist() == [bool(m) for m in mask]
    assert not pairs.mask[1, 1, len(ids) :].any()
    batch = pair_batch(pairs, torch.tensor([1, 0]).numpy())  # chosen rows, then rejected ones
    assert batch["input_ids"].shape == (4, 48)
    assert torch.equal(batch["input_ids"][1], torch.from_numpy(pairs.tokens[0, 0, :-1]))
    assert torch.equal(batch["input_ids"][3], torch.from_numpy(pairs.tokens[0, 1, :-1]))
    assert (batch["labels"][1] != -100).sum() == len(chosen) + 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "chosen": "b"}', r"pairs\.jsonl:2: missing field 'rejected'"),
        ('{"prompt": "a", "chosen": "b", "rejected": 3}', r"pairs\.jsonl:2: field 'rejected' must be"),
        ('{"prompt": 5, "chosen": "b", "rejected": "c"}', r"pairs\.jsonl:2: field 'prompt' must be"),
        ("not json", r"pairs\.jsonl:2: not valid JSON"),
    ],
)
def test_bad_pairs_name_file_line_and_field(tmp_path, tokenizer_dir, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' + line + "\n")
    with pytest.raises(InputError, match=message):
        read_pairs(path, tokenizer_dir, seq_len=32)


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory, plays, tokenizer_dir):
    folder = tmp_path_factory.mktemp("dpo")
    lines = play_lines(plays, 232)
    base = base_checkpoint(folder / "base", tokenizer_dir)
    return (
        base,
        write_pairs(folder / "train.jsonl", lines[:200]),
        write_pairs(folder / "held.jsonl", lines[200:]),
    )


def _held_out_margins(policy, reference, pairs_file, tokenizer_dir, beta=0.1):
    """(mean implicit reward margin, accuracy) of the pairs in `pairs_file`."""
    pairs = read_pairs(pairs_file, tokenizer_dir, seq_len=64)
    batch = pair_batch(pairs, torch.arange(len(pairs)).numpy())
    with torch.no_grad():
        ratio = sequence_logps(policy(batch["input_ids"]), batch["labels"]) - sequence_logps(
            reference(batch["input_ids"]), batch["labels"]
        )
    half = len(pairs)
    margin = beta * (ratio[:half] - ratio[half:])
    return margin.mean().item(), (margin > 0).float().mean().item()


def _dpo(base, train, out, *extra):
    return stage(
        "dpo",
        "--config",
        "configs/tiny.yaml",
        f"checkpoint.init_from={base}",
        f"dpo.data={train}",
        f"train.out_dir={out}",
        "train.steps=12",
        "optim.lr=0.003",
        "optim.min_lr=0.0003",
        "logging.every=6",
        "logging.tensorboard=false",
        "checkpoint.every=0",
        *extra,
    )


def test_dpo_with_lora_raises_the_held_out_margin(preference_data, tokenizer_dir, tmp_path):
    base, train, held = preference_data
    run = result(
        _dpo(base, train, tmp_path / "run", "lora.rank=8", "lora.alpha=16.0", "parallel.zero_stage=2")
    )
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["dpo/accuracy"] for r in logged if "dpo/accuracy" in r]
    assert len(accuracy) == 2 and accuracy[-1] > 0.9
    reference, _, _ = load_model(base)
    policy, _, _ = load_model(merge(run["checkpoint"], tmp_path / "merged"))
    before = _held_out_margins(reference, reference, held, tokenizer_dir)
    after = _held_out_margins(policy, reference, held, tokenizer_dir)
    assert before == (0.0, 0.0)  # the policy starts as its reference
    assert after[0] > 0.1 and after[1] > 0.9, after


def test_dpo_with_a_frozen_reference_under_zero3(preference_data, tokenizer_dir, tmp_path):
    base, train, held = preference_data
    run = result(_dpo(base, train, tmp_path / "run", "parallel.zero_stage=3", "train.steps=8"))
    reference, _, _ = load_model(base)
    policy, _, _ = load_model(run["checkpoint"])
    margin, accuracy = _held_out_margins(policy, reference, held, tokenizer_dir)
    assert margin > 0.1 and accuracy > 0.9, (margin, accuracy)


def test_dpo_refuses_a_missing_policy_before_starting(preference_data, capsys):
    from dist_llm.cli import main

    _, train, _ = preference_data
    assert main(["dpo", "--config", "configs/tiny.yaml", f"dpo.data={train}"]) == 2
    assert "checkpoint.init_from: DPO tunes a trained model" in capsys.readouterr().err


def test_pair_loader_splits_ranks_and_resumes_where_it_stopped(preference_data, tokenizer_dir):
    _, train, _ = preference_data
    pairs = read_pairs(train, tokenizer_dir, seq_len=64)
    ranks = [PairLoader(pairs, 4, seed=3, dp_rank=r, dp_size=2) for r in range(2)]
    per_epoch = len(pairs) // 8
    seen = [[b["input_ids"][:4] for _, b in zip(range(per_epoch), loader, strict=False)] for loader in ranks]
    rows = {tuple(x.tolist()) for batches in seen for batch in batches for x in batch}
    assert len(rows) == per_epoch * 8  # one epoch: every pair once, on one rank only
    loader = PairLoader(pairs, 4, seed=3)
    stream = iter(loader)
    for _ in range(loader.per_epoch + 2):  # into the second epoch
        next(stream)
    assert loader.state_dict() == {"epoch": 1, "taken": 2}
    resumed = PairLoader(pairs, 4, seed=3)
    resumed.load_state_dict(loader.state_dict())
    assert torch.equal(next(iter(resumed))["input_ids"], next(stream)["input_ids"])
