"""The ledger-mark scheme (ratelimit/marks.py) on its own: the rules one by one, then a model
check that drives several replicas, a ledger and the counters through random interleavings of
reports, flushes, folds, counter losses and multi-step seeds, and requires the counters to equal
the ledger exactly once everything is written and folded."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from ratelimit.marks import (
    SPAN,
    WHOLE,
    Folded,
    Month,
    Recorded,
    SeedStart,
    fold,
    position,
    record,
    seed_begin,
    seed_finish,
)
from ratelimit.quota import Counters

EMPTY = Month(Counters(), None)


def seeded(tokens: int = 0, spend: int = 0, marks: dict[str, int] | None = None) -> Month:
    month, start = seed_begin(EMPTY, "t")
    assert start is SeedStart.HELD
    month, done = seed_finish(month, "t", tokens, spend, marks or {})
    assert done
    return month


def test_positions_grow_in_write_order() -> None:
    assert position(0) == WHOLE
    assert position(1, 0) == SPAN < position(1, 5) < position(1) < position(2, 0)
    with pytest.raises(ValueError, match="bad ledger position"):
        position(1, WHOLE)


def test_a_report_on_a_missing_month_changes_nothing() -> None:
    month, recorded = record(EMPTY, "r", 0, 10, 20)
    assert (month, recorded) == (EMPTY, Recorded.MISSING)


def test_a_report_counts_until_its_batch_is_folded_then_the_batch_counts() -> None:
    month = seeded(100, 1000)
    month, recorded = record(month, "r", 3, 10, 20)
    assert recorded is Recorded.COUNTED
    assert month.counters == Counters(110, 1020)
    # The batch holds 12 tokens (another report of generation 3 whose counter update failed).
    month, folded = fold(month, "r", position(3), 12, 25)
    assert folded is Folded.FOLDED
    assert month.counters == Counters(112, 1025)
    # A retried fold, and the late report of that generation, change nothing.
    assert fold(month, "r", position(3), 12, 25)[1] is Folded.ALREADY
    late, recorded = record(month, "r", 3, 2, 5)
    assert (late, recorded) == (month, Recorded.SKIPPED)
    # Another replica's generations are its own.
    assert record(month, "other", 3, 1, 1)[1] is Recorded.COUNTED


def test_a_snapshot_mark_skips_the_batches_it_holds() -> None:
    month = seeded(50, 0, {"r": position(4)})
    assert record(month, "r", 4, 10, 0)[1] is Recorded.SKIPPED
    assert fold(month, "r", position(4), 10, 0)[1] is Folded.ALREADY
    month, recorded = record(month, "r", 5, 10, 0)
    assert recorded is Recorded.COUNTED
    assert month.counters.tokens == 60


def test_folds_during_a_seed_are_settled_against_the_snapshot() -> None:
    month, _ = seed_begin(EMPTY, "mine")
    assert fold(month, "r", position(1), 7, 0)[1] is Folded.HELD
    month, _ = fold(month, "r", position(1), 7, 0)
    month, _ = fold(month, "r", position(2), 5, 0)
    assert fold(month, "r", position(2), 5, 0)[0] == month  # a retry is held once
    # The snapshot was read after batch 1 was written, before batch 2.
    month, done = seed_finish(month, "mine", 7, 0, {"r": position(1)})
    assert done
    assert month.counters.tokens == 12
    assert month.mark("r") == position(2)


def test_a_seed_whose_hold_is_gone_installs_nothing() -> None:
    month, _ = seed_begin(EMPTY, "first")
    assert seed_begin(month, "second")[1] is SeedStart.BUSY
    assert seed_begin(month, "first")[1] is SeedStart.HELD
    lost_again, done = seed_finish(EMPTY, "first", 1, 1, {})
    assert (lost_again, done) == (EMPTY, False)
    taken, _ = seed_begin(EMPTY, "second")
    assert seed_finish(taken, "first", 1, 1, {})[1] is False


def test_a_partial_loss_is_seeded_whole() -> None:
    month = seeded(100, 100)
    survivor = Month(Counters(tokens=month.counters.tokens), month.ledger)
    assert not survivor.complete
    assert record(survivor, "r", 0, 1, 1)[1] is Recorded.MISSING
    held, start = seed_begin(survivor, "t")
    assert start is SeedStart.HELD
    assert held.counters == Counters()


# The model check.


@dataclass
class Batch:
    generation: int
    amounts: list[tuple[int, int]]
    """One (tokens, spend) per ledger row."""
    split: bool = False
    parts_written: int = 0


@dataclass
class Replica:
    name: str
    generation: int = 0
    tally: list[tuple[int, int]] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)
    updates: list[tuple[int, int, int, str]] = field(default_factory=list)
    """Counter updates waiting for a retry: (generation, tokens, spend, operation id)."""
    applied: list[tuple[int, int, int, str]] = field(default_factory=list)
    """Updates applied whose reply may still be retried (lost with the operation keys)."""
    folds: list[tuple[int, int, int]] = field(default_factory=list)
    seed: tuple[str, tuple[int, int, dict[str, int]] | None] | None = None
    """(the seed's token, the snapshot it read or None yet)."""


@dataclass
class World:
    rng: random.Random
    replicas: list[Replica]
    month: Month = EMPTY
    ledger_tokens: int = 0
    ledger_spend: int = 0
    ledger_marks: dict[str, int] = field(default_factory=dict)
    remembered: set[str] = field(default_factory=set)
    """Operation ids the limiter remembers (lost with a full loss)."""
    next_id: int = 0

    def report(self, r: Replica) -> None:
        amount = (self.rng.randint(1, 50), self.rng.randint(0, 90))
        r.tally.append(amount)
        self.next_id += 1
        r.updates.append((r.generation, *amount, str(self.next_id)))
        self.apply_update(r)

    def apply_update(self, r: Replica) -> None:
        if not r.updates:
            return
        generation, tokens, spend, op = r.updates[0]
        if op not in self.remembered:
            month, recorded = record(self.month, r.name, generation, tokens, spend)
            if recorded is Recorded.MISSING:
                self.begin_seed(r)
                return
            self.month = month
            self.remembered.add(op)
        r.applied.append(r.updates.pop(0))

    def replay(self, r: Replica) -> None:
        """A retry of an applied update whose reply was lost."""
        if r.applied:
            generation, tokens, spend, op = self.rng.choice(r.applied)
            if op not in self.remembered:
                month, recorded = record(self.month, r.name, generation, tokens, spend)
                if recorded is not Recorded.MISSING:
                    self.month = month
                    self.remembered.add(op)

    def enqueue(self, r: Replica) -> None:
        if r.tally:
            r.batches.append(Batch(r.generation, r.tally))
            r.tally = []
            r.generation += 1

    def write(self, r: Replica) -> None:
        if not r.batches:
            return
        batch = r.batches[0]
        if not batch.split and len(batch.amounts) > 1 and self.rng.random() < 0.2:
            batch.split = True  # the store refused it whole: written row by row
        if batch.split:
            written = [batch.amounts.pop(0)]
            at = position(batch.generation, batch.parts_written)
            batch.parts_written += 1
            if not batch.amounts:
                r.batches.pop(0)
        else:
            written = r.batches.pop(0).amounts
            at = position(batch.generation)
        tokens, spend = sum(t for t, _ in written), sum(s for _, s in written)
        self.ledger_tokens += tokens
        self.ledger_spend += spend
        self.ledger_marks[r.name] = max(self.ledger_marks.get(r.name, -1), at)
        r.folds.append((at, tokens, spend))

    def fold(self, r: Replica) -> None:
        if not r.folds:
            return
        month, folded = fold(self.month, r.name, *r.folds[0])
        if folded is Folded.MISSING:
            self.begin_seed(r)
            return
        self.month = month
        r.folds.pop(0)

    def begin_seed(self, r: Replica) -> None:
        token = r.seed[0] if r.seed else f"seed-{r.name}"
        month, start = seed_begin(self.month, token)
        self.month = month
        r.seed = (token, None) if start is SeedStart.HELD else None

    def snapshot(self, r: Replica) -> None:
        if r.seed and r.seed[1] is None:
            taken = (self.ledger_tokens, self.ledger_spend, dict(self.ledger_marks))
            r.seed = (r.seed[0], taken)

    def finish(self, r: Replica) -> None:
        if r.seed and r.seed[1] is not None:
            tokens, spend, marks = r.seed[1]
            self.month, _ = seed_finish(self.month, r.seed[0], tokens, spend, marks)
            r.seed = None

    def lose(self) -> None:
        kind = self.rng.choice(["all", "counters", "tokens", "hash"])
        if kind == "all":
            self.month = EMPTY
            self.remembered.clear()
        elif kind == "counters":
            self.month = Month(Counters(), self.month.ledger)
        elif kind == "tokens":
            self.month = Month(Counters(None, self.month.counters.spend_micros), self.month.ledger)
        else:
            self.month = Month(self.month.counters, None)  # also a seed hold expiring

    def step(self) -> None:
        r = self.rng.choice(self.replicas)
        action = self.rng.choice(
            [self.report] * 6
            + [self.enqueue, self.write, self.write, self.fold, self.fold, self.apply_update]
            + [self.replay, self.snapshot, self.finish, self.begin_seed]
        )
        if self.rng.random() < 0.01:
            self.lose()
        else:
            action(r)

    def settle(self) -> None:
        """Every replica writes and folds everything; seeds run to their end."""
        for _ in range(1000):
            busy = False
            for r in self.replicas:
                self.enqueue(r)
                while r.batches:
                    self.write(r)
                self.snapshot(r)
                self.finish(r)
                self.apply_update(r)
                self.fold(r)
                busy = busy or bool(r.updates or r.folds or r.seed)
            if not busy and self.month.complete:
                return
            if not self.month.complete:
                self.begin_seed(self.replicas[0])
        raise AssertionError("never settled")


@pytest.mark.parametrize("seed", range(300))
def test_counters_equal_the_ledger_after_any_interleaving(seed: int) -> None:
    rng = random.Random(seed)
    world = World(rng, [Replica(f"r{n}") for n in range(3)])
    for cycle in range(5):
        for _ in range(rng.randint(20, 200)):
            world.step()
        world.settle()
        assert world.month.counters == Counters(world.ledger_tokens, world.ledger_spend), cycle
