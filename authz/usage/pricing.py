"""Spend = tokens * price per million, by model, with a default row ("*") for unknown models.

USD per 1M tokens is exactly micro-USD per token. Charges are exact fractions of a micro-USD
(the price as written, times tokens); the counters take whole micro-USD, and `SpendCarry`
carries each workspace's fractional remainder within the month, so a million 1-token requests
at $0.15 per 1M bill $0.15, not $0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction

from authz.models import ModelPrice

DEFAULT_MODEL = "*"


class PriceTable:
    """Prices in memory."""

    def __init__(self, prices: Iterable[ModelPrice] = ()) -> None:
        self._prices = {p.model: p for p in prices}

    def replace(self, prices: Iterable[ModelPrice]) -> None:
        self._prices = {p.model: p for p in prices}

    def price_for(self, model: str | None) -> ModelPrice | None:
        found = self._prices.get(model) if model else None
        return found or self._prices.get(DEFAULT_MODEL)


def _rate(usd_per_1m: float) -> Fraction:
    """Micro-USD per token, exactly as the price was written (0.15, not 0.1499999...)."""
    return Fraction(repr(usd_per_1m))


def spend_exact(price: ModelPrice | None, prompt_tokens: int, completion_tokens: int) -> Fraction:
    """Micro-USD, exactly."""
    if price is None:
        return Fraction(0)
    return prompt_tokens * _rate(price.input_per_1m_usd) + completion_tokens * _rate(
        price.output_per_1m_usd
    )


def estimate_exact(price: ModelPrice | None, tokens: int) -> Fraction:
    """Micro-USD for tokens whose split between prompt and completion is unknown (a reservation,
    or usage never reported): all at the model's higher rate, so a cap is never passed by an
    underestimate."""
    if price is None:
        return Fraction(0)
    return tokens * max(_rate(price.input_per_1m_usd), _rate(price.output_per_1m_usd))


def estimate_micros(price: ModelPrice | None, tokens: int) -> int:
    """`estimate_exact`, rounded up: a reservation never under-reserves."""
    return math.ceil(estimate_exact(price, tokens))


def carry_spend(remainder: Fraction, exact: Fraction) -> tuple[int, Fraction]:
    """(whole micro-USD to charge now, the remainder to carry): over any sequence of charges,
    the sum charged is the floor of the exact sum, so it never drifts by a micro-USD or more."""
    total = remainder + exact
    whole = math.floor(total)
    return whole, total - whole


class SpendCarry:
    """Each workspace's fractional micro-USD, carried within its month (a new month starts at 0:
    its counters are new too)."""

    def __init__(self) -> None:
        self._carried: dict[str, tuple[str, Fraction]] = {}

    def charge(self, workspace_id: str, period: str, exact: Fraction) -> int:
        held_period, remainder = self._carried.get(workspace_id, (period, Fraction(0)))
        if held_period != period:
            remainder = Fraction(0)
        whole, remainder = carry_spend(remainder, exact)
        self._carried[workspace_id] = (period, remainder)
        return whole
