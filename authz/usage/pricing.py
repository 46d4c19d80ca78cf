"""Spend = tokens * price per million, by model, with a default row ("*") for unknown models.

USD per 1M tokens is exactly micro-USD per token. Charges are exact: a price as written (0.15,
not the float's 0.1499999...) is a whole number of `UNITS_PER_MICRO`ths of a micro-USD per
token, so every charge, sum and remainder is a plain integer of those units (no fractions on
the access-log path). The counters take whole micro-USD, and `SpendCarry` carries each
workspace's remainder within the month, so a million 1-token requests at $0.15 per 1M bill
$0.15, not $0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from fractions import Fraction

from authz.models import ModelPrice

DEFAULT_MODEL = "*"
UNITS_PER_MICRO = 10**18
"""The exact unit: 10^-18 micro-USD. Any price written with up to 18 decimals (USD per 1M
tokens) is exact in it; one written finer (no price list does) is rounded up to it, so an
estimate never falls short."""


class PriceTable:
    """Prices in memory."""

    def __init__(self, prices: Iterable[ModelPrice] = ()) -> None:
        self._prices = {p.model: p for p in prices}

    def replace(self, prices: Iterable[ModelPrice]) -> None:
        self._prices = {p.model: p for p in prices}

    def price_for(self, model: str | None) -> ModelPrice | None:
        found = self._prices.get(model) if model else None
        return found or self._prices.get(DEFAULT_MODEL)


@functools.lru_cache(maxsize=4096)
def rate_units(usd_per_1m: float) -> int:
    """Units per token, exactly as the price was written (its shortest decimal form). Cached:
    the decimal form is parsed once per distinct price, not per request."""
    return math.ceil(Fraction(repr(usd_per_1m)) * UNITS_PER_MICRO)


def spend_units(
    price: ModelPrice | None, prompt_tokens: int, completion_tokens: int, estimated: int = 0
) -> int:
    """Units charged for reported tokens at their own rates, plus `estimated` tokens (a
    reservation, or usage never reported: the split is unknown) all at the model's higher
    rate, so a cap is never passed by an underestimate."""
    if price is None:
        return 0
    rate_in = rate_units(price.input_per_1m_usd)
    rate_out = rate_units(price.output_per_1m_usd)
    return (
        prompt_tokens * rate_in
        + completion_tokens * rate_out
        + estimated * (rate_in if rate_in > rate_out else rate_out)
    )


def spend_exact(price: ModelPrice | None, prompt_tokens: int, completion_tokens: int) -> Fraction:
    """Micro-USD, exactly."""
    return Fraction(spend_units(price, prompt_tokens, completion_tokens), UNITS_PER_MICRO)


def estimate_exact(price: ModelPrice | None, tokens: int) -> Fraction:
    """Micro-USD for tokens whose split between prompt and completion is unknown (a reservation,
    or usage never reported): all at the model's higher rate (see `spend_units`)."""
    return Fraction(spend_units(price, 0, 0, tokens), UNITS_PER_MICRO)


def estimate_micros(price: ModelPrice | None, tokens: int) -> int:
    """`estimate_exact`, rounded up: a reservation never under-reserves."""
    return -(-spend_units(price, 0, 0, tokens) // UNITS_PER_MICRO)


def carry_units(remainder: int, units: int) -> tuple[int, int]:
    """(whole micro-USD to charge now, the units to carry): over any sequence of charges, the
    sum charged is the floor of the exact sum, so it never drifts by a micro-USD or more."""
    return divmod(remainder + units, UNITS_PER_MICRO)


def _as_units(amount: Fraction) -> int:
    units = amount * UNITS_PER_MICRO
    if units.denominator != 1:
        raise ValueError(f"{amount} micro-USD is not a whole number of units")
    return units.numerator


def carry_spend(remainder: Fraction, exact: Fraction) -> tuple[int, Fraction]:
    """`carry_units` in micro-USD fractions."""
    whole, rest = carry_units(_as_units(remainder), _as_units(exact))
    return whole, Fraction(rest, UNITS_PER_MICRO)


class SpendCarry:
    """Each workspace's remainder (units below a micro-USD), carried within its month (a new
    month starts at 0: its counters are new too)."""

    def __init__(self) -> None:
        self._carried: dict[str, tuple[str, int]] = {}

    def charge_units(self, workspace_id: str, period: str, units: int) -> int:
        """Whole micro-USD to charge now for `units`."""
        held = self._carried.get(workspace_id)
        remainder = held[1] if held is not None and held[0] == period else 0
        whole, remainder = carry_units(remainder, units)
        self._carried[workspace_id] = (period, remainder)
        return whole

    def charge(self, workspace_id: str, period: str, exact: Fraction) -> int:
        """`charge_units` for an amount in micro-USD."""
        return self.charge_units(workspace_id, period, _as_units(exact))
