"""A clone of the repository alone has every file its README and docs link to.

Every relative link in README.md and docs/*.md (inline `[text](target)` and reference
`[label]: target`, outside code blocks) must name a file git tracks in this repository, never a
path outside it, and a `#fragment` into a Markdown file must name one of its headings.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

from tests.deploy.conftest import REPO

DOCUMENTS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^\s*(```|~~~).*?^\s*\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # https:, mailto:, ...
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


@cache
def tracked() -> frozenset[str]:
    """The files a clone has: git's index, or every file when this is not a checkout."""
    result = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=30, check=False
    )
    if result.returncode != 0:
        return frozenset(p.relative_to(REPO).as_posix() for p in REPO.rglob("*") if p.is_file())
    return frozenset(name for name in result.stdout.decode().split("\0") if name)


def links(text: str) -> list[str]:
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    return INLINE.findall(prose) + REFERENCE.findall(prose)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(h) for h in HEADING.findall(prose)}


def problems(document: Path, text: str) -> list[str]:
    """What is wrong with the links of `text`, the content of `document`."""
    found = []
    for target in links(text):
        if EXTERNAL.match(target):
            continue
        path_part, _, fragment = target.partition("#")
        resolved = (document.parent / path_part).resolve() if path_part else document
        if not resolved.is_relative_to(REPO):
            found.append(f"{target}: outside the repository")
            continue
        relative = resolved.relative_to(REPO).as_posix()
        if relative not in tracked():
            found.append(f"{target}: {relative} is not a file in the repository")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            found.append(f"{target}: no heading #{fragment} in {relative}")
    return found


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves_inside_the_repository(document: Path) -> None:
    assert problems(document, document.read_text(encoding="utf-8")) == []


def test_the_checker_catches_broken_links() -> None:
    """Negative control: the links the README once had, and the usual mistakes, are refused."""
    document = REPO / "docs" / "probe.md"  # never written: only its place matters
    text = (
        "See [the contract](../../shared/CONTRACT.md), [gone](missing.md),"
        " [bad anchor](keys.md#no-such-heading), [ok](keys.md#sign-in),"
        " [web](https://example.com) and `[code](nowhere.md)`.\n"
        "```\n[fenced](nowhere.md)\n```\n[ref]: ../LICENSE\n"
    )
    assert len(links(text)) == 6, "code spans and fenced blocks hold no links"
    assert problems(document, text) == [
        "../../shared/CONTRACT.md: outside the repository",
        "missing.md: docs/missing.md is not a file in the repository",
        "keys.md#no-such-heading: no heading #no-such-heading in docs/keys.md",
    ]
