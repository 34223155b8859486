"""Byte-level BPE tokenizer (HF `tokenizers`), saved so that `transformers` loads it as is."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dist_llm.data.clean import clean_text
from dist_llm.data.documents import InputError, ReadOptions, expand_inputs, read_documents
from dist_llm.files import (
    OutputKind,
    check_output_dir,
    holds_only,
    sha256_file,
    staged_output,
    write_json_atomic,
)

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML turns (data/chat.py)
SPECIAL_TOKENS = (EOT, PAD, IM_START, IM_END)
REQUIRED_TOKENS = (EOT,)  # what sharding needs; the others are there in every tokenizer trained here
# The built-in chat template, ChatML (the one SmolLM2 and Qwen use): a turn is
# <|im_start|>role\ncontent<|im_end|>\n. Written as transformers stores templates, with Jinja escapes.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")  # what train writes
TOKENIZER_FOLDER = OutputKind(
    "a tokenizer folder",
    f"a folder holding {TOKENIZER_FILE} and nothing else but {' and '.join(TOKENIZER_FILES[1:])}",
    lambda path: holds_only(path, [TOKENIZER_FILE], TOKENIZER_FILES),
)


@dataclass(frozen=True)
class TokenizerInfo:
    path: Path
    vocab_size: int
    eot_id: int
    pad_id: int | None
    sha256: str


def train_tokenizer(
    inputs: Sequence[str],
    vocab_size: int,
    out_dir: str | Path,
    read: ReadOptions | None = None,
    overwrite: bool = False,
) -> TokenizerInfo:
    """Train byte-level BPE on the (cleaned) documents of `inputs` and save it to `out_dir`."""
    read = read or ReadOptions()
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise InputError(f"--vocab-size {vocab_size} is below the 256 byte symbols plus special tokens")
    files = expand_inputs(inputs)
    out = Path(out_dir)
    check_output_dir(out, TOKENIZER_FOLDER, overwrite)  # before training, which can take a while
    tokenizer = Tokenizer(models.BPE())
    # No normalizer: byte-level BPE then round-trips every UTF-8 string exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    counts: Counter = Counter()
    tokenizer.train_from_iterator(_texts(files, read, counts), trainer=trainer)
    if not counts["trained_documents"]:  # a tokenizer of bytes only would be saved silently
        names = ", ".join(str(f) for f in files[:3]) + (
            f" and {len(files) - 3} more" if len(files) > 3 else ""
        )
        raise InputError(f"{names}: no text to train on (empty, or only whitespace); check --input")
    if tokenizer.get_vocab_size() < vocab_size:
        # BPE stops when no pair is seen at least twice: the corpus is too small for the vocabulary.
        log.warning(
            "the corpus gave only %d of the %d tokens asked for (--vocab-size): BPE found no more "
            "pairs seen twice in %d input files; train on more text or ask for fewer tokens",
            tokenizer.get_vocab_size(),
            vocab_size,
            len(files),
        )
    with staged_output(out, TOKENIZER_FOLDER, overwrite) as staging:
        _save(tokenizer, staging)
    return load_tokenizer_info(out)


def _save(tokenizer: Tokenizer, out: Path) -> None:
    tokenizer.save(str(out / TOKENIZER_FILE))
    # What transformers.AutoTokenizer / PreTrainedTokenizerFast.from_pretrained(out) reads.
    write_json_atomic(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": EOT,
            "bos_token": EOT,
            "unk_token": EOT,
            "pad_token": PAD,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            "chat_template": CHATML_TEMPLATE,
        },
    )
    write_json_atomic(out / "special_tokens_map.json", {"eos_token": EOT, "bos_token": EOT, "pad_token": PAD})


def _texts(files: list[Path], read: ReadOptions, counts: Counter) -> Iterator[str]:
    for path in files:
        for doc in read_documents(path, read, counts):
            raw = "\n".join(content for _, content in doc.messages) or doc.prompt + doc.text
            text = clean_text(raw, mask_pii=False, counts=counts)
            if text.strip():
                counts["trained_documents"] += 1
                yield text


def tokenizer_path(location: str | Path) -> Path:
    path = Path(location)
    path = path / TOKENIZER_FILE if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"tokenizer not found at {location}: run `dist-llm tokenizer train` first")
    return path


def load_tokenizer(location: str | Path) -> Tokenizer:
    """Load for encoding data: special-token strings inside documents stay plain text."""
    tokenizer = Tokenizer.from_file(str(tokenizer_path(location)))
    # A document that literally contains "<|endoftext|>" must not forge a document boundary.
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer_info(location: str | Path) -> TokenizerInfo:
    path = tokenizer_path(location)
    tokenizer = Tokenizer.from_file(str(path))
    ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
    missing = [tok for tok in REQUIRED_TOKENS if ids[tok] is None]
    if missing:
        raise InputError(
            f"{path}: tokenizer lacks special tokens {missing}; train it with dist-llm tokenizer train"
        )
    return TokenizerInfo(
        path=path,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        eot_id=ids[EOT],
        pad_id=ids[PAD],  # None for a tokenizer without one (SmolLM2's): nothing reads it
        sha256=sha256_file(path),
    )


def describe(info: TokenizerInfo) -> str:
    return json.dumps(
        {"path": str(info.path), "vocab_size": info.vocab_size, "eot_id": info.eot_id, "sha256": info.sha256}
    )
