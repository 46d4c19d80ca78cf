"""What a SQL backend must supply to the shared store core, and the one way calls are run.

The core (`authz.store.sql`) writes every statement once with `?` placeholders and owns every
business rule. A dialect (SQLite, PostgreSQL) supplies only what really differs: connections
and transactions, placeholders, time encoding, row locking, how a change is announced, and
which driver errors mean "unavailable", "conflict" or "try again".
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Protocol, TypeVar

from authz.store.base import (
    Change,
    ChangeSink,
    Conflict,
    SchemaMissing,
    StoreError,
    StoreUnavailable,
)
from authz.store.rows import Row

log = logging.getLogger(__name__)

T = TypeVar("T")
H = TypeVar("H")

MAX_RETRIES = 3
"""Reruns after a rolled-back transaction (deadlock, serialization), with a growing pause."""
_FIRST_BACKOFF = 0.01


class Tx(Protocol):
    """One connection (in a transaction for writes), with `?` placeholders in every dialect."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; the number of rows it changed."""
        ...

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None: ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...


class Retry(Enum):
    """Whether a failed call may run again."""

    NEVER = "never"
    ROLLED_BACK = "rolled back"
    """The server rolled the transaction back (deadlock, serialization): always safe to rerun."""
    CONNECTION = "connection"
    """The connection failed: a commit may have landed, so only idempotent work reruns."""


@dataclass(frozen=True, slots=True)
class Failure:
    """A driver error translated: what to raise, and whether to try again first."""

    error: StoreError
    retry: Retry = Retry.NEVER

    @classmethod
    def conflict(cls, error: BaseException) -> Failure:
        """A unique constraint refused the write; the core words the message."""
        return cls(Conflict(str(error)))

    @classmethod
    def schema_missing(cls, error: BaseException) -> Failure:
        return cls(
            SchemaMissing(
                f"the database schema is missing or out of date ({error}): run `authz migrate`"
            )
        )

    @classmethod
    def unavailable(cls, database: str, error: BaseException, retry: Retry) -> Failure:
        detail = str(error) or type(error).__name__
        return cls(StoreUnavailable(f"{database} unavailable: {detail}"), retry)


def opened(handle: H | None) -> H:
    """The driver's connection or pool, once `open()` has made it."""
    if handle is None:
        raise StoreUnavailable("store is not open")
    return handle


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds a call may take, pool acquire and retries included."""

    read: float
    """Point reads on the request path (a key lookup, a workspace, a schema check)."""
    write: float = 10.0
    """Transactions, and lists and reports read by people."""


class Dialect(ABC):
    """The per-backend half of a SQL store; `SqlStore` builds every rule on top of it."""

    name: str
    """The migrations folder (`authz/migrations/<name>/`)."""
    for_update: str
    """Appended to a SELECT that must lock its rows until commit ("" where writers serialize)."""
    time_type: str
    """The column type of a timestamp."""

    def __init__(self, *, timeouts: Timeouts) -> None:
        self._read_timeout = timeouts.read
        self._write_timeout = timeouts.write

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def _connection(self) -> AbstractAsyncContextManager[Tx]:
        """A connection for reads (autocommit)."""

    @abstractmethod
    def _transaction(self) -> AbstractAsyncContextManager[Tx]:
        """A connection in a write transaction, committed when the block ends without error."""

    @abstractmethod
    def _classify(self, error: Exception) -> Failure | None:
        """The store error a driver error means, or None for a bug (re-raised as is)."""

    @abstractmethod
    def _describe(self) -> str:
        """The database, named for error messages (no password)."""

    @abstractmethod
    def _t(self, value: datetime) -> Any:
        """A timestamp as the driver stores it."""

    @abstractmethod
    def _parse_time(self, value: Any) -> datetime:
        """A stored timestamp back as an aware datetime."""

    @abstractmethod
    async def _announce(self, tx: Tx, now: datetime, change: Change) -> None:
        """Tell every replica about `change` when (and only if) `tx` commits."""

    @abstractmethod
    async def _lock_migrations(self, tx: Tx) -> None:
        """Keep concurrent `migrate` runs apart for the rest of `tx`."""

    @abstractmethod
    async def _run_script(self, tx: Tx, sql: str) -> None:
        """Run a migration file's statements inside `tx`."""

    @abstractmethod
    async def watch_changes(self, sink: ChangeSink) -> None: ...

    async def _read(self, work: Callable[[Tx], Awaitable[T]], *, seconds: float | None = None) -> T:
        """Run `work` on a connection, bounded by the read timeout (or `seconds`)."""
        limit = self._read_timeout if seconds is None else seconds
        return await self._run(work, self._connection, seconds=limit, idempotent=True)

    async def _write(self, work: Callable[[Tx], Awaitable[T]], *, idempotent: bool = False) -> T:
        """Run `work` in one transaction, bounded by the write timeout."""
        return await self._run(
            work, self._transaction, seconds=self._write_timeout, idempotent=idempotent
        )

    async def _run(
        self,
        work: Callable[[Tx], Awaitable[T]],
        connect: Callable[[], AbstractAsyncContextManager[Tx]],
        *,
        seconds: float,
        idempotent: bool,
    ) -> T:
        # One deadline for the pool acquire, every attempt and the backoff between them.
        try:
            async with asyncio.timeout(seconds):
                return await self._attempts(work, connect, idempotent=idempotent)
        except TimeoutError as error:
            raise StoreUnavailable(
                f"{self._describe()} unavailable: no answer within {seconds:g} s"
            ) from error

    async def _attempts(
        self,
        work: Callable[[Tx], Awaitable[T]],
        connect: Callable[[], AbstractAsyncContextManager[Tx]],
        *,
        idempotent: bool,
    ) -> T:
        backoff = _FIRST_BACKOFF
        rolled_back = 0
        reconnected = False
        while True:
            try:
                async with connect() as tx:
                    return await work(tx)
            except StoreError:
                raise
            except Exception as error:
                failure = self._classify(error)
                if failure is None:
                    raise
                if failure.retry is Retry.ROLLED_BACK and rolled_back < MAX_RETRIES:
                    rolled_back += 1
                    log.warning("database transaction rolled back, running it again: %s", error)
                    await asyncio.sleep(backoff)
                    backoff *= 2
                elif failure.retry is Retry.CONNECTION and idempotent and not reconnected:
                    # Once, at once: a dead pooled connection is replaced by a fresh one, and
                    # a database that is really down should fail fast, not after pauses.
                    reconnected = True
                    log.warning("database connection lost, trying a new one: %s", error)
                else:
                    raise failure.error from error
