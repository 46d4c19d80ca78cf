"""Exact money: charges carry their fractional micro-USD, deny messages show the cap, and
rows without a model are filed under the request's resource."""

from __future__ import annotations

import math
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from authz.decision import usd
from authz.models import ModelPrice
from authz.usage.events import parse_entry, resource_of
from authz.usage.pricing import SpendCarry, carry_spend, spend_exact
from tests.unit.test_usage import ALLOW, entry

CHEAP = ModelPrice("gpt", 0.15, 0.6)


def test_a_million_tiny_requests_bill_the_exact_price() -> None:
    """At $0.15 per 1M input tokens a 1- or 3-token prompt costs 0.15 or 0.45 micro-USD:
    rounded per request that bills 0, carried it bills the exact total."""
    carry = SpendCarry()
    charged = 0
    tokens = 0
    spends = {prompt: spend_exact(CHEAP, prompt, 0) for prompt in (1, 3)}
    for n in range(10**6):
        prompt = 1 if n % 2 else 3
        tokens += prompt
        charged += carry.charge("ws", "2026-11", spends[prompt])
    exact = tokens * Fraction(15, 100)
    assert exact - 1 < charged <= exact
    assert charged == 300_000  # $0.30 for 2M tokens at $0.15 per 1M


@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)), min_size=1, max_size=300),
    st.sampled_from([0.15, 0.6, 2.5, 10.0, 0.0375, 1e-6, 123.456]),
)
def test_carried_charges_never_drift_a_micro_usd(
    requests: list[tuple[int, int]], price: float
) -> None:
    table = ModelPrice("m", price, price * 4)
    remainder = Fraction(0)
    charged = 0
    exact = Fraction(0)
    for prompt, completion in requests:
        spend = spend_exact(table, prompt, completion)
        exact += spend
        whole, remainder = carry_spend(remainder, spend)
        charged += whole
        assert 0 <= remainder < 1
    assert charged == math.floor(exact)


def test_a_new_month_starts_without_the_old_remainder() -> None:
    carry = SpendCarry()
    assert carry.charge("ws", "2026-11", Fraction(9, 10)) == 0
    assert carry.charge("ws", "2026-12", Fraction(9, 10)) == 0
    assert carry.charge("ws", "2026-12", Fraction(2, 10)) == 1


def test_prices_are_exact_as_written() -> None:
    assert spend_exact(CHEAP, 3, 0) == Fraction(45, 100)
    assert spend_exact(None, 3, 0) == 0


def test_deny_amounts_show_enough_decimals() -> None:
    assert usd(0.002) == "0.002"
    assert usd(0.1) == "0.10"
    assert usd(5) == "5.00"
    assert usd(0.000_001) == "0.000001"


def test_rows_without_a_model_carry_the_path_resource() -> None:
    log = entry(ALLOW, None, 503)
    log.request.path = "/v1/models"
    event = parse_entry(log)
    assert event is not None
    assert event.model == "/v1/models"
    assert resource_of("/v1/files/file-abc?purpose=x") == "/v1/files"
    assert resource_of("/v1/chat/completions") == "/v1/chat/completions"
    assert resource_of("") == "unknown"
