"""Redis key names for the workspace buckets and usage counters: the one place with the prefixes.

All keys of a workspace share the hash tag `{ws:<id>}`, so they live in one hash slot and the
Lua script may touch them together on Redis Cluster:

    authz:rl:v1:{ws:<id>}:req            request bucket (hash: l, t)
    authz:rl:v1:{ws:<id>}:tok            token bucket   (hash: l, t)
    authz:rl:v1:{ws:<id>}:qt:<YYYY-MM>   tokens used in the period (integer string)
    authz:rl:v1:{ws:<id>}:qs:<YYYY-MM>   micro-USD spent in the period (integer string)
    authz:rl:v1:{ws:<id>}:ql:<YYYY-MM>   the period's ledger marks (hash, see ratelimit.marks)
    authz:rl:v1:{ws:<id>}:ops            replies of recent adjust/record calls (hash: operation
                                         id -> reply), each kept a minute so a retry of that
                                         call is answered, not applied twice
    authz:rl:v1:{ws:<id>}:rsv:<id>       a signed reservation already reported (SET NX, an hour)
"""

from __future__ import annotations

REDIS_KEY_PREFIX = "authz:rl:v1"
"""Bump the version when the stored bucket format changes, so old state is ignored, not misread.
(Not to be confused with authz.keys.KEY_PREFIX, the API keys' prefix.)"""

REQUESTS_SUFFIX = "req"
TOKENS_SUFFIX = "tok"
QUOTA_TOKENS_SUFFIX = "qt"
QUOTA_SPEND_SUFFIX = "qs"
QUOTA_LEDGER_SUFFIX = "ql"
OPERATIONS_SUFFIX = "ops"
RESERVATION_SUFFIX = "rsv"


def workspace_hash_tag(workspace_id: str) -> str:
    """The `{ws:<id>}` hash tag that pins all of one workspace's keys to one slot."""
    return "{ws:" + workspace_id + "}"


def bucket_keys(workspace_id: str) -> tuple[str, str]:
    """The (requests, tokens) bucket keys of one workspace, in the order the script expects."""
    tag = workspace_hash_tag(workspace_id)
    return (
        f"{REDIS_KEY_PREFIX}:{tag}:{REQUESTS_SUFFIX}",
        f"{REDIS_KEY_PREFIX}:{tag}:{TOKENS_SUFFIX}",
    )


def touched_bucket_keys(workspace_id: str, *, rpm: int, tpm: int) -> tuple[str, str]:
    """`bucket_keys`, with the key of a bucket the script never touches (its limit is 0:
    unlimited) replaced by the other one.

    On Redis Cluster a script may only name keys it touches: while a slot migrates, Redis
    answers TRYAGAIN to a script whose keys exist in part, and a bucket with no limit never
    exists. Naming a key twice is not "several keys" to Redis, and the script reads each
    position only when that bucket's limit is set.
    """
    requests, tokens = bucket_keys(workspace_id)
    if not tpm:
        return requests, requests
    if not rpm:
        return tokens, tokens
    return requests, tokens


def usage_keys(workspace_id: str, period: str) -> tuple[str, str]:
    """The (tokens used, spend used) counter keys of one workspace and period ("YYYY-MM")."""
    tag = workspace_hash_tag(workspace_id)
    return (
        f"{REDIS_KEY_PREFIX}:{tag}:{QUOTA_TOKENS_SUFFIX}:{period}",
        f"{REDIS_KEY_PREFIX}:{tag}:{QUOTA_SPEND_SUFFIX}:{period}",
    )


def month_keys(workspace_id: str, period: str) -> tuple[str, str, str]:
    """The (tokens used, spend used, ledger marks) keys of one workspace and period."""
    tag = workspace_hash_tag(workspace_id)
    ledger = f"{REDIS_KEY_PREFIX}:{tag}:{QUOTA_LEDGER_SUFFIX}:{period}"
    return (*usage_keys(workspace_id, period), ledger)


def script_keys(workspace_id: str, period: str) -> tuple[str, str, str, str]:
    """KEYS for a script call that touches the quota: both buckets, then both counters."""
    return (*bucket_keys(workspace_id), *usage_keys(workspace_id, period))


def operations_key(workspace_id: str) -> str:
    """The hash remembering the replies of the workspace's recent operations, by operation id.
    One key for all, not one per operation: a Redis Cluster slot that is migrating away takes
    no new keys, and this one exists whenever the workspace's other keys do."""
    return f"{REDIS_KEY_PREFIX}:{workspace_hash_tag(workspace_id)}:{OPERATIONS_SUFFIX}"


def reservation_key(workspace_id: str, reservation_id: str) -> str:
    """The key marking one signed reservation as already reported, in the workspace's slot."""
    return (
        f"{REDIS_KEY_PREFIX}:{workspace_hash_tag(workspace_id)}:{RESERVATION_SUFFIX}:"
        f"{reservation_id}"
    )
