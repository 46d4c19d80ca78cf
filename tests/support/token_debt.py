"""Workloads whose real usage runs past (or short of) what they reserved, and the bound on tokens
over time that every rate limiter must keep under them (issue 17, finding 6).

The bound: at the moment a request is admitted, everything the workspace was charged over any
window ending then (reservations when admitted, the reported difference when the usage came in,
refunds subtracted) is at most `tpm * window / 60 s + tpm`: the limit times the window, plus one
bucket. Overuse reported after the last admission is the debt the next admission waits for.
An overuse forgiven by the limiter (the old clamp at minus one bucket) breaks it at once.

`drive` runs one workload on any `RateLimiter` and returns what the limiter answered, so the
in-process and Redis twins can be run on the same workload and compared answer by answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from hypothesis import strategies as st

from ratelimit import bucket
from ratelimit.limiter import LimitResult, Limits, QuotaState, RateLimiter

_EXACT_RETRY_MS = 2**43
"""Below this a retry-after in float seconds turns back into its exact milliseconds."""

WINDOW_MS = 10 * 60 * 1000
"""The issue's window; the ledger checks every window ending at an admission, this one too."""

PERIOD = "2025-06"


class SteppedClock(Protocol):
    """A test clock in milliseconds that the driver moves by hand."""

    now: int


@dataclass(frozen=True)
class Step:
    """One thing a client or the accountant does.

    acquire: ask for `amount` tokens; if admitted, the request goes in flight and really uses
    `usage`. report: the in-flight request number `amount` (modulo how many there are) reports
    its usage, through `record_usage` or, when `counted` is False, `adjust_tokens`. retry: after
    a TPM denial, wait one millisecond short of its retry-after (still denied), then the rest
    (admitted, using `usage`). wait: `amount` milliseconds pass.
    """

    kind: str
    amount: int = 0
    usage: int = 0
    counted: bool = True


@dataclass(frozen=True)
class Workload:
    limits: Limits
    steps: list[Step]


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    """Small and large TPM limits, requests that use nothing, about their estimate, or 1000
    times it, several in flight at once. Usage stays below `bucket.MAX_CHARGE` per report and
    `bucket.MAX_DEBT` in total (40 steps of at most 10^9), the only places debt is cut."""
    tpm = draw(st.one_of(st.integers(1, 100), st.integers(101, 100_000), st.just(2000)))
    rpm = draw(st.one_of(st.just(0), st.integers(1, 30)))
    cost = st.one_of(st.integers(0, tpm // 2), st.integers(0, tpm + tpm // 4))
    usage = st.one_of(
        st.just(0),
        st.integers(0, 2 * tpm),
        st.integers(0, 1000 * tpm + 100_000),
        st.integers(0, 10**9),
    )
    wait = st.one_of(
        st.integers(0, 2_000),
        st.integers(0, 70_000),
        st.integers(0, 3_600_000),
        st.integers(0, 100_000_000),  # long enough to pay off a debt of 1000 buckets
    )
    steps = st.one_of(
        st.builds(Step, kind=st.just("acquire"), amount=cost, usage=usage),
        st.builds(Step, kind=st.just("acquire"), amount=cost, usage=usage),
        st.builds(Step, kind=st.just("report"), amount=st.integers(0, 8), counted=st.booleans()),
        st.builds(Step, kind=st.just("report"), amount=st.integers(0, 8), counted=st.booleans()),
        st.builds(Step, kind=st.just("retry"), usage=usage),
        st.builds(Step, kind=st.just("wait"), amount=wait),
    )
    return Workload(Limits(rpm=rpm, tpm=tpm), draw(st.lists(steps, min_size=5, max_size=40)))


@dataclass
class Ledger:
    """The ground truth of one workspace: what was charged when, checked at every admission."""

    tpm: int
    charges: list[tuple[int, int]] = field(default_factory=list)
    """(time in ms, tokens): reservations and reported differences, in time order."""

    def admitted(self, now_ms: int, reserved: int) -> None:
        self.charges.append((now_ms, reserved))
        self.check(now_ms)

    def reported(self, now_ms: int, delta: int) -> None:
        self.charges.append((now_ms, delta))

    def check(self, now_ms: int) -> None:
        """Every window ending now, from any earlier event, keeps the bound (exact integers:
        tokens * 60 000 against tpm per millisecond)."""
        total = 0
        for start_ms, tokens in reversed(self.charges):
            total += tokens
            allowance = self.tpm * (now_ms - start_ms) + bucket.capacity(self.tpm)
            assert total * bucket.UNITS_PER_TOKEN <= allowance, (
                f"{total} tokens charged in the {now_ms - start_ms} ms up to an admission, "
                f"more than TPM {self.tpm} allows ({allowance // bucket.UNITS_PER_TOKEN})"
            )

    def in_window(self, start_ms: int, end_ms: int) -> int:
        """Tokens charged in [start_ms, end_ms]."""
        return sum(tokens for at, tokens in self.charges if start_ms <= at <= end_ms)


@dataclass
class _InFlight:
    reserved: int
    usage: int


Answer: TypeAlias = LimitResult | QuotaState | None


async def drive(
    limiter: RateLimiter, clock: SteppedClock, workload: Workload, *, workspace: str = "ws-debt"
) -> list[Answer]:
    """Run `workload` on `limiter` (whose clock is `clock`), keeping and checking its ledger.

    Returns every answer the limiter gave, in order (None for `adjust_tokens`).
    """
    limits = workload.limits
    ledger = Ledger(limits.tpm)
    flying: list[_InFlight] = []
    answers: list[Answer] = []
    last_denied: tuple[int, LimitResult] | None = None

    async def ask(cost: int, usage: int) -> LimitResult:
        result = await limiter.acquire(workspace, limits, cost)
        answers.append(result)
        if result.allowed:
            ledger.admitted(clock.now, cost)
            flying.append(_InFlight(reserved=cost, usage=usage))
        return result

    for step in workload.steps:
        if step.kind == "acquire":
            result = await ask(step.amount, step.usage)
            denied = not result.allowed and not result.too_large
            last_denied = (step.amount, result) if denied else None
            continue
        wait_ms = round(last_denied[1].retry_after_seconds * 1000) if last_denied else 0
        if step.kind == "retry" and last_denied is not None and wait_ms < _EXACT_RETRY_MS:
            cost = last_denied[0]
            clock.now += wait_ms - 1
            early = await ask(cost, step.usage)
            assert not early.allowed, "admitted before its retry-after"
            clock.now += 1
            assert (await ask(cost, step.usage)).allowed, "denied at its retry-after"
        elif step.kind == "report" and flying:
            request = flying.pop(step.amount % len(flying))
            delta = request.usage - request.reserved
            if step.counted:
                state = await limiter.record_usage(
                    workspace,
                    limits,
                    period=PERIOD,
                    tpm_delta=delta,
                    tokens=request.usage,
                    spend_micros=0,
                )
                answers.append(state)
            else:
                await limiter.adjust_tokens(workspace, limits, delta)
                answers.append(None)
            ledger.reported(clock.now, delta)
        elif step.kind == "wait":
            clock.now += step.amount
        last_denied = None
    return answers
