"""URL helpers that settings, the store and the logs share, with no dependencies of their own."""

from __future__ import annotations

from urllib.parse import urlsplit


def redact_url(url: str) -> str:
    """A URL fit for logs and errors: any password replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def is_sqlite_url(url: str) -> bool:
    """`sqlite:///PATH` names the embedded store; anything else is PostgreSQL."""
    return url.startswith("sqlite:")
