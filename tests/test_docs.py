"""The configuration reference must cover every key the code accepts."""

import dataclasses
import re
from pathlib import Path

from dist_llm.config import Config

DOCS = Path(__file__).resolve().parents[1] / "docs"


def keys(cls, prefix=""):
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(field.type):
            yield from keys(field.type, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}"


def test_config_reference_lists_every_key():
    documented = set(re.findall(r"^\| `([a-z_.N0-9]+)` \|", (DOCS / "config.md").read_text(), re.M))
    expected = set(keys(Config)) | {"data.sources.N.path", "data.sources.N.weight"}
    assert expected == documented, (expected - documented, documented - expected)
