"""Spend = tokens * price per million, by model, with a default row ("*") for unknown models."""

from __future__ import annotations

from collections.abc import Iterable

from authz.models import ModelPrice

DEFAULT_MODEL = "*"


class PriceTable:
    """Prices in memory; spend in integer micro-USD so sums never drift."""

    def __init__(self, prices: Iterable[ModelPrice] = ()) -> None:
        self._prices = {p.model: p for p in prices}

    def replace(self, prices: Iterable[ModelPrice]) -> None:
        self._prices = {p.model: p for p in prices}

    def price_for(self, model: str | None) -> ModelPrice | None:
        found = self._prices.get(model) if model else None
        return found or self._prices.get(DEFAULT_MODEL)

    def spend_micros(self, model: str | None, prompt_tokens: int, completion_tokens: int) -> int:
        return spend_micros_at(self.price_for(model), prompt_tokens, completion_tokens)


def spend_micros_at(price: ModelPrice | None, prompt_tokens: int, completion_tokens: int) -> int:
    """Micro-USD: tokens * USD per 1M tokens is exactly micro-USD per token."""
    if price is None:
        return 0
    return round(
        prompt_tokens * price.input_per_1m_usd + completion_tokens * price.output_per_1m_usd
    )
