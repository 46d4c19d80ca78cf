"""API keys: generation, checksum, hashing, masking and public ids (CONTRACT §1).

A key is `sk-oais_` + 40 random base62 characters + a 6-character base62 CRC32 of those
40 characters. The checksum lets us reject typos and look-alikes without touching the
cache, the database or Redis, and lets `authz scan` find real keys with no false positives.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
import zlib
from urllib.parse import unquote

from authz.models import NewKey

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
KEY_PREFIX = "sk-oais_"
BODY_LENGTH = 40
CHECKSUM_LENGTH = 6
KEY_LENGTH = len(KEY_PREFIX) + BODY_LENGTH + CHECKSUM_LENGTH
KEY_PATTERN = re.compile(r"sk-oais_[0-9A-Za-z]{46}")
_MASK_STARS = "*" * 10
_SAFE_MASK_CHARS = frozenset(BASE62 + "-_")
_ID_LENGTH = 16


def _base62(number: int, width: int) -> str:
    digits = []
    while number:
        number, remainder = divmod(number, 62)
        digits.append(BASE62[remainder])
    return "".join(reversed(digits)).rjust(width, "0")


def checksum(body: str) -> str:
    """The 6-character base62 CRC32 of a key's random body."""
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def generate_key() -> str:
    """A new secret key: about 238 bits from `secrets`, plus its checksum."""
    body = "".join(secrets.choice(BASE62) for _ in range(BODY_LENGTH))
    return KEY_PREFIX + body + checksum(body)


def is_well_formed(candidate: str) -> bool:
    """True when `candidate` has the key format and a valid checksum."""
    if len(candidate) != KEY_LENGTH or KEY_PATTERN.fullmatch(candidate) is None:
        return False
    body = candidate[len(KEY_PREFIX) : len(KEY_PREFIX) + BODY_LENGTH]
    return candidate[-CHECKSUM_LENGTH:] == checksum(body)


def hash_key(key: str) -> bytes:
    """SHA-256 of the whole key: the only form in which a key is stored."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def mask_key(value: str) -> str:
    """`sk-oa**********25xx`: the only form in which a key appears in lists, logs and errors.

    Client-supplied junk is masked too; anything too short to mask without revealing most of
    it, or holding characters unsafe in a log line, shows no characters at all.
    """
    if len(value) < 20 or not _SAFE_MASK_CHARS.issuperset(value[:5] + value[-4:]):
        return _MASK_STARS
    return value[:5] + _MASK_STARS + value[-4:]


def _random_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(BASE62) for _ in range(_ID_LENGTH))


def new_key_id() -> str:
    """A public, stable key id, safe to log (`key_` + 16 base62)."""
    return _random_id("key_")


def new_workspace_id() -> str:
    """A public workspace id (`ws_` + 16 base62)."""
    return _random_id("ws_")


def mint_key(workspace_id: str, label: str) -> tuple[str, NewKey]:
    """A fresh secret and the record that stores it: hash, mask and id, never the secret."""
    secret = generate_key()
    return secret, NewKey(
        id=new_key_id(),
        workspace_id=workspace_id,
        label=label,
        key_hash=hash_key(secret),
        mask=mask_key(secret),
    )


def find_keys(text: str) -> list[tuple[int, str]]:
    """Every checksum-valid key in `text`, with its character offset; look-alikes are skipped."""
    return [(m.start(), m.group()) for m in KEY_PATTERN.finditer(text) if is_well_formed(m.group())]


MAX_DECODINGS = 8
"""Percent-decoding rounds tried on text that may hide a key (`sk%252Doais_` is two)."""


def decoded_forms(text: str) -> list[str]:
    """`text` and each successive percent-decoding of it, until stable (bounded)."""
    forms = [text]
    while "%" in forms[-1] and len(forms) <= MAX_DECODINGS:
        decoded = unquote(forms[-1])
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    return forms


def key_like_in(text: str) -> str | None:
    """The first key-looking string (`sk-oais_` and what follows it) in `text` or in any of its
    percent-decodings, checksum or not: the one rule for URLs and free-text fields."""
    for form in decoded_forms(text):
        start = form.find(KEY_PREFIX)
        if start >= 0:
            end = start + len(KEY_PREFIX)
            while end < len(form) and (form[end].isalnum() or form[end] in "-_"):
                end += 1
            return form[start:end]
    return None


def holds_live_key(text: str) -> bool:
    """True when `text`, or a percent-decoding of it, holds a checksum-valid key."""
    return any(find_keys(form) for form in decoded_forms(text))
