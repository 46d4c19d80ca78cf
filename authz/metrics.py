"""Prometheus collectors for the sidecar, registered on a registry we are handed (no globals)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from ratelimit.metrics import RateLimitMetrics

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """Every collector the sidecar exports, on one registry."""

    def __init__(self, registry: CollectorRegistry, *, workspace_label: bool = True) -> None:
        self.registry = registry
        # The process_*, python_info and python_gc_* series the default registry would have.
        for standard in (ProcessCollector, PlatformCollector, GCCollector):
            standard(registry=registry)
        self._workspace_label = workspace_label
        self.checks = Counter(
            "authz_checks",
            "ext_authz Check decisions, by decision and OpenAI error code.",
            ["decision", "code"],
            registry=registry,
        )
        self.check_latency = Histogram(
            "authz_check_duration_seconds",
            "Time to answer one Check, from request to response.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.cache = Counter(
            "authz_key_cache_lookups",
            "Key cache lookups by result: hit, negative_hit, miss, stale (served while the "
            "database was down).",
            ["result"],
            registry=registry,
        )
        self.cache_size = Gauge(
            "authz_key_cache_entries", "Entries in the key cache.", ["kind"], registry=registry
        )
        self.store_errors = Counter(
            "authz_store_errors",
            "Database calls that failed or timed out, by operation.",
            ["operation"],
            registry=registry,
        )
        self.store_latency = Histogram(
            "authz_store_duration_seconds",
            "Database lookups made on the request path (cache misses).",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        # PostgreSQL's connection budget, per process: the pool (plus the change feed's one
        # LISTEN session, not pooled). Absent on SQLite.
        self.db_pool_size = Gauge(
            "authz_db_pool_size",
            "PostgreSQL connections the pool may hold (AUTHZ_DB_POOL_SIZE); the change feed "
            "holds one more.",
            registry=registry,
        )
        self.db_pool_in_use = Gauge(
            "authz_db_pool_connections_in_use",
            "PostgreSQL pool connections lent out to a query or transaction right now.",
            registry=registry,
        )
        self.db_pool_waiting = Gauge(
            "authz_db_pool_acquires_waiting",
            "Database calls waiting for a pool connection right now.",
            registry=registry,
        )
        self.db_pool_waits = Counter(
            "authz_db_pool_waits",
            "Database calls that found every pool connection in use, by result: acquired (got "
            "one in time) or gave_up (the call's timeout ran out first: pool exhausted).",
            ["result"],
            registry=registry,
        )
        self.invalidations = Counter(
            "authz_cache_invalidations",
            "Cache invalidations received, by kind (key, ws, reset).",
            ["kind"],
            registry=registry,
        )
        self.fail_open = Counter(
            "authz_fail_open_admissions",
            "Requests allowed without a rate-limit decision because the backend failed and "
            "AUTHZ_FAILURE_MODE=open.",
            registry=registry,
        )
        self.keys_stripped = Counter(
            "authz_forwarded_keys_stripped",
            "Request headers other than Authorization removed before the upstream because "
            "they held an API key.",
            registry=registry,
        )
        self.ratelimit_decisions = Counter(
            "authz_ratelimit_decisions",
            "Rate-limit outcomes: admitted, denied_requests, denied_tokens, too_large.",
            ["result"],
            registry=registry,
        )
        self.near_limit = Counter(
            "authz_ratelimit_near_limit",
            "Admissions that left a bucket under 10% of its limit, by bucket.",
            ["kind"],
            registry=registry,
        )
        self.ready = Gauge(
            "authz_ready",
            "1 while the sidecar can authorize (readiness), by component.",
            ["component"],
            registry=registry,
        )
        self.task_up = Gauge(
            "authz_background_task_up",
            "1 while a background task runs, 0 while it waits to be restarted after a crash.",
            ["task"],
            registry=registry,
        )
        self.task_restarts = Counter(
            "authz_background_task_restarts",
            "Background tasks restarted after a crash, by task.",
            ["task"],
            registry=registry,
        )
        self.limiter = RateLimitMetrics(registry)
        self.workspace_requests = Counter(
            "authz_workspace_requests",
            "Allowed requests as Envoy finished them, by workspace and status class (2xx...).",
            ["workspace", "status_class"],
            registry=registry,
        )
        self.workspace_tokens = Counter(
            "authz_workspace_tokens",
            "Tokens charged, by workspace and kind: prompt and completion (reported by the "
            "upstream), estimated (usage not reported: the reservation charged).",
            ["workspace", "kind"],
            registry=registry,
        )
        self.workspace_spend = Counter(
            "authz_workspace_spend_usd",
            "Spend in USD at the configured model prices, by workspace.",
            ["workspace"],
            registry=registry,
        )
        self.workspace_upstream_latency = Histogram(
            "authz_workspace_upstream_duration_seconds",
            "Upstream time of allowed requests (first byte sent to last byte received).",
            ["workspace"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
            registry=registry,
        )
        self.workspace_denials = Counter(
            "authz_workspace_denials",
            "Requests denied for a known workspace, by reason (error code and type).",
            ["workspace", "reason"],
            registry=registry,
        )
        self.shadow_denials = Counter(
            "authz_shadow_denials",
            "Requests a shadow workspace admitted that its limits would have denied, by "
            "workspace and reason (error code and type).",
            ["workspace", "reason"],
            registry=registry,
        )
        self.reconciliations = Counter(
            "authz_usage_reconciliations",
            "Access-log entries reconciled, by result: reported, estimated (no usage "
            "reported: the reservation charged), no_usage (an error answer or nothing "
            "reserved: refunded), limiter_unavailable (a counter update failed: retried).",
            ["result"],
            registry=registry,
        )
        self.entries_refused = Counter(
            "authz_usage_entries_refused",
            "Access-log entries dropped before accounting, by reason: unsigned (no reservation), "
            "bad_mac (not signed by a current key), too_old (reservation over an hour old), "
            "replay (reservation already reported).",
            ["reason"],
            registry=registry,
        )
        self.replay_unchecked = Counter(
            "authz_usage_replay_unchecked",
            "Signed access-log entries counted without the replay check (Redis did not answer).",
            registry=registry,
        )
        self.ledger_flushes = Counter(
            "authz_ledger_flushes",
            "Ledger flushes by result: applied, duplicate (a retry already applied), failed "
            "(an outage: retried), split (refused for a reason other than an outage: retried "
            "row by row).",
            ["result"],
            registry=registry,
        )
        self.ledger_rows_set_aside = Counter(
            "authz_ledger_rows_set_aside",
            "Ledger rows the store refused even alone, set aside so the rest still land.",
            registry=registry,
        )
        self.ledger_queue_rows = Gauge(
            "authz_ledger_queue_rows",
            "Ledger rows waiting to be written (bounded; readiness fails while it is full).",
            registry=registry,
        )
        self.usage_counter_queue = Gauge(
            "authz_usage_counter_queue",
            "Usage reports whose quota counters and bucket wait for a retry (rate limiter or "
            "workspace lookup unavailable); readiness fails while the queue is full.",
            registry=registry,
        )
        self.usage_fields_rejected = Counter(
            "authz_usage_fields_rejected",
            "Strings from responses replaced by a marker (not printable, or too long), by field.",
            ["field"],
            registry=registry,
        )

    def workspace(self, workspace_id: str) -> str:
        """The workspace label value; one shared value when the label is turned off."""
        return workspace_id if self._workspace_label else "_all"
