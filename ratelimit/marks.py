"""Exact month counters after a loss: the ledger high-water marks, mirrored by the Lua scripts.

The month's counters (tokens used, micro-USD spent) grow by each usage report as soon as it is
reconciled, while the ledger (the SQL store) gets the same report later, in the next flush of
the replica that reconciled it. When Redis loses the counters, they are rebuilt from the ledger
while other replicas keep reporting and flushing; a plain "ledger total, SET NX" then counts a
report twice (increment after the seed, ledger row before the snapshot) or never (increment
before the loss, ledger row after the snapshot). Issue 18, finding 8b.

The scheme
----------
Positions. Each replica (an accountant, id `replica`) numbers its ledger batches: every report
it tallies belongs to one *generation* `g`, written whole in one batch, or, when the store
refuses that batch, row by row. The batch's *position* is `g * SPAN + SPAN - 1` (whole) or
`g * SPAN + n` (the n-th row of a split one), so a replica's positions grow in write order.

The ledger side (SQL, in the batch's transaction): per workspace, period and replica, the
highest position written (the *mark*). A snapshot reads the totals and the marks in one
statement, so it holds exactly the batches at or below its marks.

The counter side: beside the two counters, a hash (`ledger`) holds per replica the position
folded into the counters (`m:<replica>`), the reports counted but not yet folded, per
generation (`f:<replica>`, "in flight"), and, while a seed is under way, its token
(`seeding`) and the folds that arrived meanwhile (`p:<replica>`). The month is *complete*
when both counters exist and the hash says `ok`.

* `record` (a report of generation g): applied to a complete month only, and only when the
  replica's mark is below generation g (else its batch is already in the counters); it adds to
  both counters and to g's in-flight amounts. On an incomplete month it changes nothing: the
  caller seeds, then repeats it.
* `fold` (after batch position p is written, with the batch's amounts for this month): on a
  complete month with the mark below p, the counters gain the batch's ledger amounts and lose
  the in-flight amounts of every generation up to p's (their reports are now counted by the
  ledger's figures), and the mark becomes p. At or below the mark: nothing (a retry). During a
  seed: kept in `p:<replica>` for the seed to settle. On a missing month: nothing; the caller
  seeds, then repeats it. A replica folds its batches in write order.
* `seed_begin` (token): on an incomplete month, delete what is left of it and hold the hash
  with the token (for `hold_ms`; a seeder that died frees it). `seed_finish` (token, snapshot
  totals and marks): only while the hash still holds this token, sets the counters to the
  snapshot plus each held fold above the snapshot's mark for its replica, and the marks to the
  larger of both.

Why it is exact. Every written batch of a replica reaches a complete month exactly once: by
the snapshot (position at or below the seed's mark) or by its fold (above it), never both,
since a fold at or below the mark changes nothing and folds are applied in position order. A
fold that went into a month lost later is not lost: its batch was written before the loss,
hence before the next seed's hold, hence before that seed's snapshot (a seed whose hold was
lost or taken finds its token gone and starts over with a fresh snapshot). A report's own
increment only stands in for its batch until that batch is folded (the fold removes it), and
is skipped once the batch is in the counters. So once every batch is written and folded, the
counters equal the ledger, whatever the interleaving of flushes, reports, losses and seeds.
(A row the store refuses for good is set aside by the accountant and never reaches the ledger:
its report's count stays in flight until that replica's next batch for the month is folded,
and from then on the counters follow the ledger without it.) Spend is folded as the batch's
USD in whole micro-USD, rounded like the snapshot's total, so it is exact to the micro-USD
whenever each row is.

Both backends run these functions on the same stored form: the Redis scripts (ledger.lua and
the record_month, fold, seed_begin and seed_finish bodies) on the keys, the in-process limiter
on a Python copy; the field names and formats below are the hash's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

from ratelimit.quota import MAX_COUNTER, Counters

SPAN = 1 << 20
"""Positions per generation: more than the rows one batch can hold (a split writes row n at
`g * SPAN + n`), small enough that positions of 2^32 generations stay exact in Lua doubles."""

WHOLE = SPAN - 1
"""The part number of a batch written whole: above every row of its split form."""

OK = "ok"
SEEDING = "seeding"

_REPLICA = re.compile(r"[0-9A-Za-z_-]{1,64}")


class Recorded(IntEnum):
    """What `record` did (the scripts' third reply value)."""

    MISSING = 0
    """The month is incomplete: nothing changed, seed and repeat."""
    COUNTED = 1
    SKIPPED = 2
    """The report's batch is already in the counters."""


class Folded(IntEnum):
    """What `fold` did (the script's reply)."""

    MISSING = 0
    """No month and no seed under way: nothing changed, seed and repeat."""
    FOLDED = 1
    ALREADY = 2
    HELD = 3
    """A seed is under way: kept for it to settle."""


class SeedStart(IntEnum):
    """What `seed_begin` found (the script's reply)."""

    COMPLETE = 0
    HELD = 1
    """Held for this token: read the snapshot, then `seed_finish`."""
    BUSY = 2
    """Another seeder holds it: wait for the month to become complete."""


def position(generation: int, part: int | None = None) -> int:
    """A batch's position: its generation and, for a split batch's row, the row number."""
    if generation < 0 or (part is not None and not 0 <= part < WHOLE):
        raise ValueError(f"bad ledger position {generation}/{part}")
    return generation * SPAN + (WHOLE if part is None else part)


def check_replica(replica: str) -> str:
    """`replica` itself when it is a safe hash-field suffix (it is part of field names)."""
    if not _REPLICA.fullmatch(replica):
        raise ValueError(f"bad replica id {replica!r}")
    return replica


Entry = tuple[int, int, int]
"""(generation or position, tokens, micro-USD), as `f:` and `p:` fields list them."""


def entries(text: str | None) -> list[Entry]:
    """A `f:`/`p:` field's entries ("n:t:s;n:t:s"), in stored order."""
    if not text:
        return []
    parsed = []
    for item in text.split(";"):
        n, t, s = item.split(":")
        parsed.append((int(n), int(t), int(s)))
    return parsed


def joined(items: list[Entry]) -> str:
    return ";".join(f"{n}:{t}:{s}" for n, t, s in items)


@dataclass(frozen=True, slots=True)
class Month:
    """One workspace and period as stored: the two counters and the ledger hash (None when
    the key is absent)."""

    counters: Counters
    ledger: Mapping[str, str] | None

    @property
    def complete(self) -> bool:
        return self.counters.known and self.ledger is not None and self.ledger.get(OK) == "1"

    def mark(self, replica: str) -> int:
        """The position folded for `replica`; -1 for none."""
        held = None if self.ledger is None else self.ledger.get(f"m:{replica}")
        return -1 if held is None else int(held)


def _clamped(value: int) -> int:
    return max(0, min(value, MAX_COUNTER))


def record(
    month: Month, replica: str, generation: int, tokens: int, spend: int
) -> tuple[Month, Recorded]:
    """A report of `generation` (amounts normalised, see `quota.normalise_amount`)."""
    if not month.complete or month.ledger is None:
        return month, Recorded.MISSING
    if month.mark(replica) >= generation * SPAN:
        return month, Recorded.SKIPPED
    field = f"f:{replica}"
    flying = entries(month.ledger.get(field))
    for i, (g, t, s) in enumerate(flying):
        if g == generation:
            flying[i] = (g, t + tokens, s + spend)
            break
    else:
        flying.append((generation, tokens, spend))
    counters = Counters(
        tokens=min((month.counters.tokens or 0) + tokens, MAX_COUNTER),
        spend_micros=min((month.counters.spend_micros or 0) + spend, MAX_COUNTER),
    )
    return Month(counters, {**month.ledger, field: joined(flying)}), Recorded.COUNTED


def fold(month: Month, replica: str, at: int, tokens: int, spend: int) -> tuple[Month, Folded]:
    """Batch position `at` is in the ledger with these amounts for this month."""
    ledger = month.ledger
    if ledger is not None and SEEDING in ledger:
        field = f"p:{replica}"
        held = entries(ledger.get(field))
        if all(n != at for n, _, _ in held):
            ledger = {**ledger, field: joined([*held, (at, tokens, spend)])}
        return Month(month.counters, ledger), Folded.HELD
    if not month.complete or ledger is None:
        return month, Folded.MISSING
    if month.mark(replica) >= at:
        return month, Folded.ALREADY
    generation = at // SPAN
    field = f"f:{replica}"
    flying = entries(ledger.get(field))
    kept = [entry for entry in flying if entry[0] > generation]
    gone_t = sum(t for g, t, _ in flying if g <= generation)
    gone_s = sum(s for g, _, s in flying if g <= generation)
    updated = {k: v for k, v in ledger.items() if k != field}
    if kept:
        updated[field] = joined(kept)
    updated[f"m:{replica}"] = str(at)
    counters = Counters(
        tokens=_clamped((month.counters.tokens or 0) + tokens - gone_t),
        spend_micros=_clamped((month.counters.spend_micros or 0) + spend - gone_s),
    )
    return Month(counters, updated), Folded.FOLDED


def seed_begin(month: Month, token: str) -> tuple[Month, SeedStart]:
    """Hold an incomplete month for the seeder with `token` (see the module docstring)."""
    if month.complete:
        return month, SeedStart.COMPLETE
    owner = None if month.ledger is None else month.ledger.get(SEEDING)
    if owner is not None:
        return month, SeedStart.HELD if owner == token else SeedStart.BUSY
    return Month(Counters(), {SEEDING: token}), SeedStart.HELD


def seed_finish(
    month: Month, token: str, tokens: int, spend: int, marks: Mapping[str, int]
) -> tuple[Month, bool]:
    """Install a snapshot read under the hold of `token`; False (nothing changed) when the hold
    is gone (lost with the month, expired, or taken), so the seeder starts over."""
    ledger = month.ledger
    if ledger is None or ledger.get(SEEDING) != token:
        return month, False
    settled = dict(marks)
    for name, value in ledger.items():
        if not name.startswith("p:"):
            continue
        replica = name[2:]
        mark = settled.get(replica, -1)
        for at, t, s in entries(value):
            if at > mark:
                tokens, spend, mark = tokens + t, spend + s, at
        settled[replica] = mark
    fields = {OK: "1"} | {f"m:{r}": str(m) for r, m in settled.items() if m >= 0}
    counters = Counters(tokens=_clamped(tokens), spend_micros=_clamped(spend))
    return Month(counters, fields), True
