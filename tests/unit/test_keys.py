from __future__ import annotations

import re
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz.keys import (
    BASE62,
    KEY_LENGTH,
    checksum,
    find_keys,
    generate_key,
    hash_key,
    is_well_formed,
    mask_key,
    new_key_id,
)


def test_generated_keys_have_the_contract_format() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert re.fullmatch(r"sk-oais_[0-9A-Za-z]{46}", key)
        assert len(key) == KEY_LENGTH
        assert is_well_formed(key)


def test_checksum_is_base62_crc32_left_padded() -> None:
    body = "a" * 40
    number = zlib.crc32(body.encode())
    digits = ""
    while number:
        number, r = divmod(number, 62)
        digits = BASE62[r] + digits
    assert checksum(body) == digits.rjust(6, "0")


def test_a_single_changed_character_fails_the_checksum() -> None:
    key = generate_key()
    for index in range(8, KEY_LENGTH):
        replacement = "A" if key[index] != "A" else "B"
        assert not is_well_formed(key[:index] + replacement + key[index + 1 :])


@given(st.text(max_size=80))
def test_arbitrary_text_is_never_mistaken_for_a_key(text: str) -> None:
    assert not is_well_formed(text) or text.startswith("sk-oais_")


def test_mask_shows_first_five_and_last_four() -> None:
    key = generate_key()
    assert mask_key(key) == key[:5] + "*" * 10 + key[-4:]
    assert mask_key("short") == "*" * 10
    # Control characters from a client never reach a log line through a mask.
    assert mask_key("\x1b[31m" + "x" * 30) == "*" * 10


def test_hash_is_sha256_of_the_whole_key() -> None:
    import hashlib

    key = generate_key()
    assert hash_key(key) == hashlib.sha256(key.encode()).digest()


def test_key_ids_are_public_and_distinct() -> None:
    ids = {new_key_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"key_[0-9A-Za-z]{16}", i) for i in ids)


def test_find_keys_skips_look_alikes() -> None:
    real = generate_key()
    fake = real[:-1] + ("A" if real[-1] != "A" else "B")
    text = f"token={real}\nother={fake}\n"
    assert find_keys(text) == [(6, real)]


def test_one_rule_refuses_keys_in_every_free_text_field() -> None:
    from authz.store.common import InvalidInput, check_label, check_name

    key = generate_key()
    for text in (key, "prod " + key, "sk-oais_x", "see sk%252Doais_abc"):
        with pytest.raises(InvalidInput, match=r"^workspace name must not contain an API key$"):
            check_name(text)
        with pytest.raises(InvalidInput, match=r"^label must not contain an API key$"):
            check_label(text)
    assert check_name("sk-other") == "sk-other"
