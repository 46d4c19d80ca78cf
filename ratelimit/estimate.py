"""The token estimate a request reserves from its workspace's TPM bucket (CONTRACT §3).

`ceil(body_bytes / 4) + completion * choices`: the prompt is guessed from the body size, the
completion from the request's own `max_completion_tokens` / `max_tokens` (else the workspace's
default) times the choices it asks for (`n`, `best_of`). The real usage is charged or refunded
later with `RateLimiter.adjust_tokens`.
"""

from __future__ import annotations

_BYTES_PER_TOKEN = 4
MAX_ESTIMATE = 2**53 - 1
"""Estimates stay exact integers in Lua's doubles; anything this large is too large anyway."""


def estimate_tokens(*, body_bytes: int, completion_tokens: int, choices: int = 1) -> int:
    """Tokens to reserve for one request; negative inputs count as zero."""
    prompt = -(-max(body_bytes, 0) // _BYTES_PER_TOKEN)
    return min(prompt + max(completion_tokens, 0) * max(choices, 1), MAX_ESTIMATE)
