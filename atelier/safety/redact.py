"""Redaction of personal data: e-mail addresses, phone numbers, mainland resident ID numbers,
bank card numbers and IP addresses become `[EMAIL]`, `[PHONE]`, `[ID]`, `[CARD]`, `[IP]`.

    >>> r = redact("mail li.lei@example.com or call +86 138-1234-5678")
    >>> r.text
    'mail [EMAIL] or call [PHONE]'
    >>> r.spans
    [{'type': 'email', 'start': 5, 'end': 23}, {'type': 'phone', 'start': 32, 'end': 49}]

Pure: no imports from the rest of Atelier. Storage calls `redact_obj(params)` before it keeps
a request's parameters with an artifact.

How it works:
1. Each detector finds candidates with a regular expression; numbers that carry a checksum are
   kept only when it holds (resident IDs: ISO 7064 MOD 11-2 and a real, past birth date from
   1900 on; cards: Luhn and an issuer prefix of 2221–2720, 3, 4, 5 or 6), so that ordinary
   numbers (years, prices, counts, timestamps) stay.
2. Detectors run in priority order (e-mail, IPv6, IPv4, ID, card, phone); a candidate that
   overlaps a span already taken is dropped.
3. The spans, in the coordinates of the ORIGINAL text, are replaced from left to right.

What is caught:
- e-mail: ASCII `local@domain.tld`;
- phone: mainland mobiles `1[3-9]x xxxx xxxx` with or without `+86` / `0086`, spaces or dashes;
  international numbers written with a leading `+` and 8–15 digits (spaces, dots, dashes,
  parentheses between digits);
- ID: 18-character mainland resident ID numbers (last character may be X), also grouped 6-8-4;
- card: 13–19 digits, contiguous or grouped 4-4-4-… or 4-6-4/5 by spaces or dashes;
- IP: IPv4 with every octet ≤ 255 (no leading zeros) and IPv6 (checked by `ipaddress`; `::1`,
  `a::b` and other addresses with fewer than two groups or four hex digits are left alone).
What is not: names, postal addresses, landlines without `+` (`010-12345678`), 15-digit IDs of
the first generation, passport numbers, numbers spelled in words or in Chinese numerals, and a
Luhn-valid number that is not a card (one in ten random 16-digit numbers with a card prefix
passes; a dotted four-part version number `1.2.3.4` reads as an IPv4 address).
"""

from __future__ import annotations

import logging

import datetime as dt
import ipaddress
import re
from typing import Any, NamedTuple

PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "id": "[ID]", "card": "[CARD]", "ip": "[IP]"}


class Redacted(NamedTuple):
    text: str
    spans: list[dict]  # [{"type": "email", "start": 5, "end": 23}, ...], offsets into the original text


# -- validators -------------------------------------------------------------------------------

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)  # 2^(17-i) mod 11
_ID_CHECK = "10X98765432"  # check character for (Σ digit·weight) mod 11


def valid_resident_id(number: str, today: dt.date | None = None) -> bool:
    """An 18-character mainland resident ID: ISO 7064 MOD 11-2 check character and a birth date
    (characters 7–14, YYYYMMDD) between 1900-01-01 and today. `number` holds no separators."""
    if len(number) != 18 or not number[:17].isdigit() or number[0] not in "12345678":
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    if _ID_CHECK[total % 11] != number[17].upper():
        return False
    try:
        born = dt.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    return dt.date(1900, 1, 1) <= born <= (today or dt.date.today())


def luhn_ok(digits: str) -> bool:
    """The Luhn check: double every second digit from the right, sum the digits, ≡ 0 mod 10."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def valid_card(digits: str) -> bool:
    """13–19 digits, an issuer prefix in use (Mastercard 2221–2720; 3 Amex/JCB/Diners; 4 Visa;
    5 Mastercard/Maestro; 6 UnionPay/Discover) and the Luhn check."""
    if not 13 <= len(digits) <= 19:
        return False
    if not (digits[0] in "3456" or 2221 <= int(digits[:4]) <= 2720):
        return False
    return luhn_ok(digits)


def _valid_ipv6(candidate: str) -> bool:
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    groups = [g for g in candidate.split(":") if g]
    return len(groups) >= 2 and sum(map(len, groups)) >= 4  # "::", "::1", "a::b" are too common in code


# -- detectors, in priority order --------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_NOT_DIGIT_BEFORE = r"(?<![\d+])"
_NOT_DIGIT_AFTER = r"(?!\d)"

# (type, pattern, validator of the matched text or None)
_DETECTORS: list[tuple[str, re.Pattern, Any]] = [
    ("email", re.compile(r"(?<![0-9A-Za-z._%+-])[A-Za-z0-9._%+-]+"  # local part
                         r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![A-Za-z0-9-])"),  # @domain.tld
     None),
    ("ip", re.compile(r"(?<![0-9A-Za-z:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}"
                      rf"(?::{_OCTET}(?:\.{_OCTET}){{3}})?(?![0-9A-Za-z:]|\.\d)"),
     _valid_ipv6),
    ("ip", re.compile(rf"(?<![0-9A-Za-z.]){_OCTET}(?:\.{_OCTET}){{3}}(?![0-9A-Za-z]|\.\d)"), None),
    ("id", re.compile(rf"{_NOT_DIGIT_BEFORE}\d{{6}}([ -]?)\d{{8}}\1\d{{3}}[\dXx](?![0-9A-Za-z])"),
     lambda s: valid_resident_id(re.sub(r"[ -]", "", s))),
    ("card", re.compile(rf"{_NOT_DIGIT_BEFORE}(?:\d{{13,19}}"
                        r"|\d{4}([ -])\d{4}\1\d{4}\1\d{1,4}(?:\1\d{1,3})?"  # 4-4-4-4(-3), 4-4-4-1…
                        rf"|\d{{4}}([ -])\d{{6}}\2\d{{4,5}}){_NOT_DIGIT_AFTER}"),  # 4-6-5 (Amex), 4-6-4 (Diners)
     lambda s: valid_card(re.sub(r"[ -]", "", s))),
    ("phone", re.compile(rf"(?:(?:\+|(?<!\d)00)86[ -]?|{_NOT_DIGIT_BEFORE})"  # +86, 0086 or nothing
                         rf"1[3-9]\d(?:[ -]?\d{{4}}){{2}}{_NOT_DIGIT_AFTER}"),  # 138 1234 5678
     None),
    ("phone", re.compile(r"(?<![0-9A-Za-z+])\+(?:\d[ .()-]{0,2}){7,14}\d(?!\d)"),
     lambda s: 8 <= sum(c.isdigit() for c in s) <= 15),
]


def find_spans(text: str) -> list[dict]:
    """The personal data in `text`, as [{"type", "start", "end"}] sorted by start (no overlaps)."""
    taken: list[tuple[int, int, str]] = []
    for kind, pattern, valid in _DETECTORS:
        for m in pattern.finditer(text):
            start, end = m.span()
            if valid is not None and not valid(m.group()):
                continue
            if any(start < e and s < end for s, e, _ in taken):
                continue
            taken.append((start, end, kind))
    return [{"type": kind, "start": s, "end": e} for s, e, kind in sorted(taken)]


def redact(text: str) -> Redacted:
    """Replace personal data in `text` by placeholders; spans point into the original text.

    >>> redact("身份证 11010519491231002X，卡号 4111 1111 1111 1111").text
    '身份证 [ID]，卡号 [CARD]'
    """
    spans = find_spans(text)
    parts, pos = [], 0
    for span in spans:
        parts += [text[pos:span["start"]], PLACEHOLDERS[span["type"]]]
        pos = span["end"]
    parts.append(text[pos:])
    return Redacted("".join(parts), spans)


def redact_obj(value: Any) -> Any:
    """A redacted copy of a JSON-like value: every string inside dicts and lists is redacted (dict keys
    are kept as they are); numbers, booleans and None are returned unchanged.

    >>> redact_obj({"prompt": "write to a@b.io", "n": 2, "stop": ["+44 20 7946 0958"]})
    {'prompt': 'write to [EMAIL]', 'n': 2, 'stop': ['[PHONE]']}
    """
    if isinstance(value, str):
        return redact(value).text
    if isinstance(value, dict):
        return {k: redact_obj(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_obj(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that redacts personal data from every record it passes (message and arguments
    formatted first), so logs hold no e-mail address, phone, ID or card number, or IP address."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message).text
        if redacted == message:
            return True
        # Redact the arguments one by one, keeping their shape: formatters such as uvicorn's access
        # log unpack them (client address, method, path, version, status) and fail on an empty tuple.
        if isinstance(record.args, tuple) and isinstance(record.msg, str):
            record.args = tuple(redact(a).text if isinstance(a, str) else a for a in record.args)
            record.msg = redact(record.msg).text
            if redact(record.getMessage()).text == record.getMessage():
                return True
        record.msg, record.args = redacted, ()  # personal data the arguments alone do not carry
        return True
