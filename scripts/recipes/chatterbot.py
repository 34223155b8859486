"""Chat SFT data and DPO pairs from the chatterbot-corpus package (BSD licence, real English
conversations: chatterbot_corpus/data/english/*.yml, `conversations:` lists of alternating
utterances, the first one the user's).

    python scripts/recipes/chatterbot.py --out work/recipe/data [--system "Answer briefly."]

writes, in --out:
  sft_train.jsonl, sft_held.jsonl     {"messages": [{role, content}, ...]} (user/assistant turns)
  pairs_train.jsonl, pairs_held.jsonl {"prompt": [messages up to an assistant turn],
                                       "chosen": the real reply, "rejected": a mismatched reply}
and prints the counts as JSON.

Split: a conversation is held out when the SHA-256 of its first utterance (lower-cased, spaces
collapsed) falls in the lowest --held-percent of the hash range, so conversations that open alike
("Hi, how is it going?" has six answers) land on the same side, and the split never changes.
Pairs: the standard mismatched-response construction: the rejected reply is the reply of an
assistant turn drawn (seeded) from another conversation of the same split that opens differently,
so it is a real utterance that does not answer this prompt.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import sys
from pathlib import Path


def corpus_dir() -> Path:
    """chatterbot_corpus/data/english of the installed package."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "chatterbot-corpus is not installed: pip install --no-deps chatterbot-corpus==1.3.3 "
            "(scripts/setup.sh does), or pass --corpus DIR with its *.yml files"
        )
    return Path(spec.origin).parent / "data" / "english"


def read_conversations(folder: Path) -> list[tuple[str, list[str]]]:
    """(category file stem, utterances) of every distinct conversation of at least two utterances,
    in file and list order. Scalars stay strings ("Yes" is not True): YAML's BaseLoader."""
    import yaml

    files = sorted(folder.glob("*.yml"))
    if not files:
        raise SystemExit(f"{folder}: no *.yml files; pass --corpus with chatterbot's data/english")
    out, seen = [], set()
    for path in files:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
        conversations = data.get("conversations") if isinstance(data, dict) else None
        if not isinstance(conversations, list):
            raise SystemExit(f"{path}: no 'conversations:' list")
        for turns in conversations:
            if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
                continue  # malformed: 1.3.3's trivia.yml has one question and answer in one string
            turns = [" ".join(t.split()) for t in turns]
            if len(turns) >= 2 and all(turns) and tuple(turns) not in seen:
                seen.add(tuple(turns))  # the files repeat many conversations word for word
                out.append((path.stem, turns))
    return out


def opening(turns: list[str]) -> str:
    return " ".join(turns[0].lower().split())


def is_held(turns: list[str], held_percent: float) -> bool:
    digest = hashlib.sha256(opening(turns).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < held_percent / 100 * 2**64


def to_messages(turns: list[str], system: str = "") -> list[dict]:
    """User/assistant alternating, the first utterance the user's; a trailing user turn (no
    reply to train on) is dropped."""
    turns = turns[: len(turns) // 2 * 2]
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return messages


def make_pairs(conversations: list[list[dict]], seed: int) -> list[dict]:
    """One pair per assistant turn: the conversation up to it, its reply (chosen), and the reply
    of a random assistant turn of another conversation that opens differently (rejected)."""
    rng = random.Random(seed)
    replies = [
        (c, m["content"])
        for c, messages in enumerate(conversations)
        for m in messages
        if m["role"] == "assistant"
    ]
    opens = [next(m["content"].lower() for m in msgs if m["role"] == "user") for msgs in conversations]
    pairs = []
    for c, messages in enumerate(conversations):
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            for _ in range(1000):
                other, rejected = replies[rng.randrange(len(replies))]
                if other != c and opens[other] != opens[c] and rejected != message["content"]:
                    break
            else:
                raise SystemExit("too few distinct conversations to draw mismatched replies from")
            pairs.append(
                {
                    "prompt": messages[:i],
                    "chosen": message["content"],
                    "rejected": rejected,
                    "conversation": c,
                    "rejected_from": other,
                }
            )
    return pairs


def convert(
    out: Path, corpus: Path | None = None, system: str = "", held_percent: float = 10.0, seed: int = 0
) -> dict:
    conversations = read_conversations(corpus or corpus_dir())
    split = {"train": [], "held": []}
    for _, turns in conversations:
        split["held" if is_held(turns, held_percent) else "train"].append(to_messages(turns, system))
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, chats in split.items():
        pairs = make_pairs(chats, seed)
        for stem, rows in (("sft", [{"messages": m} for m in chats]), ("pairs", pairs)):
            with (out / f"{stem}_{name}.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        counts[name] = {"conversations": len(chats), "pairs": len(pairs)}
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--corpus", type=Path, help="folder of chatterbot *.yml (default: the package's English)"
    )
    parser.add_argument("--system", default="", help="a system prompt before every conversation")
    parser.add_argument("--held-percent", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0, help="draws the rejected replies")
    args = parser.parse_args(argv)
    if not 0 < args.held_percent < 100:
        parser.error("--held-percent must be between 0 and 100")
    counts = convert(args.out, args.corpus, args.system, args.held_percent, args.seed)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
