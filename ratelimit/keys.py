"""Redis key names for the workspace buckets: the one place that knows the prefixes.

Both keys of a workspace share the hash tag `{ws:<id>}`, so they live in one hash slot and the
Lua script may touch them together on Redis Cluster.
"""

from __future__ import annotations

KEY_PREFIX = "authz:rl:v1"
"""Bump the version when the stored bucket format changes, so old state is ignored, not misread."""

REQUESTS_SUFFIX = "req"
TOKENS_SUFFIX = "tok"


def workspace_hash_tag(workspace_id: str) -> str:
    """The `{ws:<id>}` hash tag that pins all of one workspace's keys to one slot."""
    return "{ws:" + workspace_id + "}"


def bucket_keys(workspace_id: str) -> tuple[str, str]:
    """The (requests, tokens) bucket keys of one workspace, in the order the script expects."""
    tag = workspace_hash_tag(workspace_id)
    return (
        f"{KEY_PREFIX}:{tag}:{REQUESTS_SUFFIX}",
        f"{KEY_PREFIX}:{tag}:{TOKENS_SUFFIX}",
    )
