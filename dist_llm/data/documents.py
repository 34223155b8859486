"""Find input files and read them as documents.

`.txt`/`.md` files hold one document per file, per line, or per blank-line-separated block;
`.jsonl` files hold one document per line (a text field; for supervised fine-tuning,
prompt/response fields or a conversation, `messages`: [{role, content}]). Any of them may be
gzip-compressed (`.gz`).
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dist_llm.errors import InputError  # defined with the other user-facing errors; imported from here too

DocSplit = Literal["file", "line", "blank-line"]
OnError = Literal["raise", "skip"]
log = logging.getLogger(__name__)
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
ROLES = ("system", "user", "assistant")  # of a conversation's messages


@dataclass(frozen=True)
class Document:
    text: str
    prompt: str = ""  # fine-tuning prompt: tokenized before `text`, never trained on
    messages: tuple[tuple[str, str], ...] = ()  # a conversation, (role, content) per message
    where: str = ""  # file:line of a conversation, for the errors found when it is tokenized


@dataclass(frozen=True)
class ReadOptions:
    doc_split: DocSplit = "file"
    text_field: str = "text"
    prompt_field: str = ""
    response_field: str = ""
    messages_field: str = ""  # JSONL field holding a conversation (data/chat.py)
    on_error: OnError = "raise"


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Expand paths, folders and globs into a sorted, de-duplicated list of input files."""
    if not patterns:
        raise InputError("no input given: pass --input with a file, folder or glob")
    files: set[Path] = set()
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = _folder_inputs(Path(pattern))
        else:
            matches = [Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)]
            matches = [p for p in matches if p.is_file()]
        if not matches:
            raise InputError(f"input '{pattern}' matches no file: check the path or quote the glob")
        for path in matches:
            if not _kind(path):
                raise InputError(f"{path}: unsupported input type; use .txt, .md or .jsonl (optionally .gz)")
            files.add(path)
    return sorted(files)


def _folder_inputs(folder: Path) -> list[Path]:
    """The readable files under `folder`; the others are named and counted, never dropped silently."""
    found = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    others = [p for p in found if not _kind(p)]
    if others:
        names = ", ".join(str(p.relative_to(folder)) for p in others[:5]) + (
            ", ..." if len(others) > 5 else ""
        )
        what = f"{len(others)} of the {len(found)} files under {folder} are not .txt, .md or .jsonl (optionally .gz)"
        if len(others) == len(found):
            raise InputError(f"{what}: none can be read ({names})")
        log.warning("skipped %s: %s", what, names)
    return [p for p in found if _kind(p)]


def _kind(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return ""


def read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: cannot read ({exc}); check that the file is complete") from None


def read_documents(path: Path, opts: ReadOptions, skipped: Counter) -> Iterator[Document]:
    """Yield the documents of one file. Problems raise, or are skipped and counted in `skipped`."""
    data = read_bytes(path)
    if _kind(path) == "jsonl":
        yield from _jsonl_documents(path, data, opts, skipped)
        return
    try:
        text = data.decode("utf-8-sig")  # a leading byte-order mark is not text
    except UnicodeDecodeError as exc:
        _fail(opts, skipped, "files_not_utf8", _utf8_message(path, exc))
        return
    if opts.doc_split == "file":
        yield Document(text)
        return
    text = text.replace("\r\n", "\n")  # split the same way whatever the line endings
    if opts.doc_split == "line":
        lines = text.split("\n")  # not splitlines(): U+2028, \x0c and \x85 are text here
        yield from (Document(line) for line in (lines[:-1] if text.endswith("\n") else lines))
    else:
        yield from (Document(block) for block in re.split(r"\n[ \t]*\n", text))


def _jsonl_documents(path: Path, data: bytes, opts: ReadOptions, skipped: Counter) -> Iterator[Document]:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            _fail(opts, skipped, "lines_not_utf8", _utf8_message(path, exc, lineno))
            continue
        except json.JSONDecodeError as exc:
            _fail(opts, skipped, "lines_bad_json", f"{path}:{lineno}: not valid JSON ({exc.msg})")
            continue
        if opts.messages_field:
            conversation, problem = _conversation(record, opts.messages_field)
            if problem:
                key = "lines_missing_field" if conversation is None else "lines_bad_messages"
                _fail(opts, skipped, key, f"{path}:{lineno}: {problem}")
                continue
            yield Document("", messages=conversation, where=f"{path}:{lineno}")
            continue
        doc = _record_document(record, opts)
        if doc is None:
            fields = _wanted_fields(opts)
            _fail(
                opts,
                skipped,
                "lines_missing_field",
                f"{path}:{lineno}: record has no string field {' / '.join(fields)}; "
                f"set --text-field (or --prompt-field/--response-field) to the field that holds the text",
            )
            continue
        yield doc


def _wanted_fields(opts: ReadOptions) -> list[str]:
    if opts.prompt_field and opts.response_field:
        return [opts.prompt_field, opts.response_field]
    return [opts.text_field]


def _record_document(record, opts: ReadOptions) -> Document | None:
    if not isinstance(record, dict):
        return None
    if opts.prompt_field and opts.response_field:
        prompt, response = record.get(opts.prompt_field), record.get(opts.response_field)
        if isinstance(prompt, str) and isinstance(response, str):
            return Document(response, prompt=prompt)
        return None
    text = record.get(opts.text_field)
    return Document(text) if isinstance(text, str) else None


def _conversation(record, field: str) -> tuple[tuple | None, str]:
    """(conversation, "") or (None or (), the problem): None when the field itself is missing."""
    messages = record.get(field) if isinstance(record, dict) else None
    if messages is None:
        return (
            None,
            f"record has no field '{field}'; set --messages-field to the field that holds the messages",
        )
    if not isinstance(messages, list) or not messages:
        return (), f"'{field}' must be a non-empty list of {{role, content}} messages"
    out = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict) or "role" not in message:
            return (), f'{where} has no \'role\' (each message is {{"role": ..., "content": ...}})'
        role, content = message["role"], message.get("content")
        if role not in ROLES:
            return (), f"{where} has role {role!r}; the roles are {', '.join(ROLES)}"
        if not isinstance(content, str):
            return (), f"{where} ({role}) has content of type {type(content).__name__}; it must be a string"
        out.append((role, content))
    if all(role != "assistant" for role, _ in out):
        return (), f"'{field}' has no assistant message: nothing in it would be trained"
    return tuple(out), ""


def _utf8_message(path: Path, exc: UnicodeDecodeError, lineno: int | None = None) -> str:
    where = f"{path}:{lineno}" if lineno else f"{path} (byte {exc.start})"
    return (
        f"{where}: not valid UTF-8 ({exc.reason}); convert it (e.g. iconv -f latin1 -t utf-8) "
        "or pass --on-error skip to skip and count such inputs"
    )


def _fail(opts: ReadOptions, skipped: Counter, what: str, message: str) -> None:
    if opts.on_error == "raise":
        raise InputError(message)
    skipped[what] += 1
