"""Document cleaning: Unicode NFC, control characters, optional PII masking.

Each step counts what it changed so that the manifest can say what happened to the data.
Exact-duplicate removal needs every document's hash and so lives in the sharding loop.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

# C0/C1 control characters except tab and newline; \r is dropped after CRLF -> LF.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
_IPV6 = re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b")
# Phone numbers: an optional +country code, then 3-4 digit groups joined by space, dot or dash,
# 10-15 digits in all. Conservative on purpose: verse numbers and dates must survive.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?!\w)"
)

EMAIL_TOKEN, IP_TOKEN, PHONE_TOKEN = "<EMAIL>", "<IP>", "<PHONE>"


def clean_text(text: str, mask_pii: bool, counts: Counter) -> str:
    """Return the cleaned text, adding what was changed to `counts`."""
    normalized = unicodedata.normalize("NFC", text)
    if normalized != text:
        counts["documents_nfc_changed"] += 1
    text = normalized.replace("\r\n", "\n")
    text, n = _CONTROL.subn("", text)
    counts["control_chars_removed"] += n
    if mask_pii:
        text = mask(text, counts)
    return text


def mask(text: str, counts: Counter) -> str:
    text, n = _EMAIL.subn(EMAIL_TOKEN, text)
    counts["emails_masked"] += n
    text, n4 = _IPV4.subn(IP_TOKEN, text)
    text, n6 = _IPV6.subn(IP_TOKEN, text)
    counts["ips_masked"] += n4 + n6

    def phone_or_keep(match: re.Match) -> str:
        if 10 <= sum(ch.isdigit() for ch in match.group(0)) <= 15:
            counts["phones_masked"] += 1
            return PHONE_TOKEN
        return match.group(0)

    return _PHONE.sub(phone_or_keep, text)
