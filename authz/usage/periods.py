"""Quota periods are UTC calendar months, named `YYYY-MM`: keyed, so nothing needs a reset job."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

from ratelimit.quota import month_period

_PERIOD = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")


def period_of(moment: datetime) -> str:
    return month_period(moment.timestamp())


def period_bounds(period: str) -> tuple[datetime, datetime]:
    """[start, end) of a `YYYY-MM` period; raises ValueError for anything else."""
    if _PERIOD.fullmatch(period) is None:
        raise ValueError(f"expected a period YYYY-MM, got {period!r}")
    start = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


def seconds_until_next_period(now_ts: float) -> float:
    _, end = period_bounds(period_of(datetime.fromtimestamp(now_ts, UTC)))
    return max(0.0, end.timestamp() - now_ts)


def hour_of(moment: datetime) -> datetime:
    """The ledger's hourly bucket for a moment."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


class HourSlots:
    """`hour_of` and `period_of` of many moments, each worked out once per hour: access-log
    entries arrive within the hour or so, so a few remembered hours answer nearly all."""

    def __init__(self, *, keep: int = 64) -> None:
        self._keep = keep
        self._slots: dict[int, tuple[datetime, str]] = {}

    def of(self, moment: datetime) -> tuple[datetime, str]:
        """(the ledger hour, the quota period) of `moment`."""
        seconds = math.floor(moment.timestamp())
        slot = seconds - seconds % 3600
        found = self._slots.get(slot)
        if found is None:
            if len(self._slots) >= self._keep:
                self._slots.clear()
            found = self._slots[slot] = (hour_of(moment), period_of(moment))
        return found
