"""The fine-tuning recipe of docs/finetuning.md in shortened form: real conversations from the
chatterbot-corpus package converted (scripts/recipes/chatterbot.py), the real SmolLM2-135M-Instruct
imported, a few steps of LoRA SFT and of LoRA DPO, scored on held-out conversations."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from dist_llm.checkpoint import load_model
from dist_llm.data.documents import ReadOptions
from dist_llm.data.pairs import pair_batch, read_pairs
from dist_llm.data.shard import ShardOptions, shard_corpus
from dist_llm.eval.perplexity import run_eval
from dist_llm.interop.hf import import_hf
from dist_llm.train.lora import merge

from ..launch_util import REPO
from .tune_util import result, stage


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chatterbot = _load("chatterbot")
scores = _load("scores")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("chatterbot")
    counts = chatterbot.convert(out / "a", system="Answer briefly.")
    return out, counts


def test_the_corpus_converts_to_alternating_turns_split_by_opening(converted):
    out, counts = converted
    folder = chatterbot.corpus_dir()
    assert len(list(folder.glob("*.yml"))) == 21
    # An independent read of the files: every distinct conversation (as strings) is kept once.
    distinct = set()
    for path in folder.glob("*.yml"):
        for turns in yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)["conversations"]:
            if isinstance(turns, list) and len(turns) >= 2:  # trivia.yml has one bare string
                distinct.add(tuple(" ".join(t.split()) for t in turns))
    train, held = _rows(out / "a" / "sft_train.jsonl"), _rows(out / "a" / "sft_held.jsonl")
    assert len(train) + len(held) == len(distinct) and len(held) > 50 and len(train) > 5 * len(held)
    got = set()
    for row in train + held:
        messages = row["messages"]
        assert messages[0] == {"role": "system", "content": "Answer briefly."}
        roles = [m["role"] for m in messages[1:]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        got.add(tuple(m["content"] for m in messages[1:]))
    # a conversation of odd length loses only its last (unanswered) utterance
    assert got == {t[: len(t) // 2 * 2] for t in distinct}

    def opens(rows):
        return {r["messages"][1]["content"].lower() for r in rows}

    assert not opens(train) & opens(held)  # split by opening: disjoint prompts
    for row in held:  # the rule, recomputed: the lowest 10% of SHA-256 of the opening
        key = " ".join(row["messages"][1]["content"].lower().split()).encode()
        assert int(hashlib.sha256(key).hexdigest()[:16], 16) < 0.1 * 2**64
    again = chatterbot.convert(out / "b", system="Answer briefly.")
    assert again == counts
    for name in ("sft_train", "sft_held", "pairs_train", "pairs_held"):
        assert (out / "a" / f"{name}.jsonl").read_bytes() == (out / "b" / f"{name}.jsonl").read_bytes()


def test_yaml_scalars_stay_text_and_unanswered_turns_are_dropped(tmp_path):
    (tmp_path / "c.yml").write_text(
        "categories: [x]\nconversations:\n- - Yes\n  - 'No'\n  - 3.0\n- - On\n  - Off\n- - alone\n"
    )
    out = tmp_path / "out"
    chatterbot.convert(out, corpus=tmp_path, held_percent=1.0)
    rows = _rows(out / "sft_train.jsonl") + _rows(out / "sft_held.jsonl")
    assert [r["messages"] for r in rows] == [
        [{"role": "user", "content": "Yes"}, {"role": "assistant", "content": "No"}],
        [{"role": "user", "content": "On"}, {"role": "assistant", "content": "Off"}],
    ]


def test_pairs_reject_a_reply_of_another_conversation(converted):
    out, _ = converted
    for split in ("train", "held"):
        chats = [r["messages"] for r in _rows(out / "a" / f"sft_{split}.jsonl")]
        pairs = _rows(out / "a" / f"pairs_{split}.jsonl")
        assert len(pairs) == sum(m["role"] == "assistant" for c in chats for m in c)
        for pair in pairs:
            own, other = chats[pair["conversation"]], chats[pair["rejected_from"]]
            turn = len(pair["prompt"])
            assert pair["prompt"] == own[:turn] and own[turn] == {
                "role": "assistant",
                "content": pair["chosen"],
            }
            assert pair["rejected"] in [m["content"] for m in other if m["role"] == "assistant"]
            assert pair["rejected_from"] != pair["conversation"] and pair["rejected"] != pair["chosen"]
            assert other[1]["content"].lower() != own[1]["content"].lower()  # opens differently


def _margins(policy_dir, reference_dir, pairs_file, count=16):
    """DPO's held-out reward margin and accuracy of the first `count` pairs (scripts/recipes/scores.py)."""
    pairs = read_pairs(pairs_file, reference_dir, seq_len=64)
    batch = pair_batch(pairs, torch.arange(count).numpy())
    reference, _, _ = load_model(reference_dir)
    ref_logps = scores.pair_logps(reference, batch)
    del reference
    policy, _, _ = load_model(policy_dir)
    return scores.pair_scores(scores.pair_logps(policy, batch), ref_logps, 0.1)


def test_smollm2_sft_then_dpo_on_chatterbot(smollm2, tmp_path):
    """A handful of LoRA SFT steps lower SmolLM2's held-out assistant loss; a few LoRA DPO steps
    on the SFT model raise the held-out reward margin over it (its reference)."""
    hf_dir, _, _ = smollm2
    data = tmp_path / "data"
    chatterbot.convert(data)  # no system prompt: SmolLM2's template adds its own
    base = import_hf(hf_dir, tmp_path / "base", seq_len=64)
    opts = ShardOptions(seq_len=64, val_fraction=0.0, read=ReadOptions(messages_field="messages"))
    for split in ("train", "held"):
        shard_corpus([str(data / f"sft_{split}.jsonl")], base, tmp_path / split, opts)
    before = run_eval(base, data=str(tmp_path / "held"), split="train", max_batches=2, device="cpu")
    sft = result(
        stage(
            "train",
            "--config",
            "configs/finetune_smollm2.yaml",
            f"checkpoint.init_from={base}",
            f"data.sources=[{{path: '{tmp_path / 'train'}'}}]",
            f"train.out_dir={tmp_path / 'sft'}",
            "data.seq_len=64",
            "train.steps=4",
            "train.micro_batch_size=4",
            "optim.warmup_steps=1",
            "checkpoint.every=4",
            "logging.every=2",
        )
    )
    sft_merged = merge(sft["checkpoint"], tmp_path / "sft-merged")
    after = run_eval(sft_merged, data=str(tmp_path / "held"), split="train", max_batches=2, device="cpu")
    assert before["tokens"] == after["tokens"] > 100
    assert after["loss"] < before["loss"] - 0.1, (before["loss"], after["loss"])

    dpo = result(
        stage(
            "dpo",
            "--config",
            "configs/dpo.yaml",
            f"checkpoint.init_from={sft_merged}",
            f"dpo.data={data / 'pairs_train.jsonl'}",
            f"train.out_dir={tmp_path / 'dpo'}",
            "data.seq_len=64",
            "train.steps=4",
            "train.micro_batch_size=4",
            "optim.warmup_steps=1",
            "optim.lr=1.0e-3",
            "checkpoint.every=4",
            "logging.every=2",
            "logging.tensorboard=false",
        )
    )
    dpo_merged = merge(dpo["checkpoint"], tmp_path / "dpo-merged")
    moved = _margins(dpo_merged, sft_merged, data / "pairs_held.jsonl")  # 0 before: policy = reference
    assert moved["dpo_margin"] > 0.05 and moved["dpo_accuracy"] > 0.6, moved
