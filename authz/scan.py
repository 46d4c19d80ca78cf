"""Leak response: find API keys in files, logs and every commit of a git repository.

Only checksum-valid keys count (authz.keys.find_keys), so look-alikes in docs and tests are not
findings. Each sighting keeps the key's hash and mask, never the key: a scan's output is safe to
paste into an incident ticket. Lookups by hash then say which key it is, whose, and whether it
still works.

Git history is read as one streamed `git log -p` over every ref and the reflog: every key that
was ever in any commit's tree was added by some commit, so scanning the added lines of every
diff (combined diffs for merges) finds it once, at the commit that introduced it, even when a
later commit deleted the file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from authz.keys import KEY_LENGTH, find_keys, hash_key, mask_key
from authz.models import ApiKey
from authz.store.base import Store

_HUNK = re.compile(r"^(@{2,}) (.*?) \1")

# The repository is untrusted (it may be the leaked material itself): its own config must not
# make git run anything. Command-line `-c` settings win over every config file, so each setting
# that could name a program, or make git verify signatures (gpg.program), is pinned here. Diffs
# use no external diff and no textconv, whatever .gitattributes says; nothing runs a pager.
_SAFE_CONFIG = (
    "core.quotePath=false",
    "log.showSignature=false",
    "core.pager=cat",
    "pager.log=false",
    "core.fsmonitor=false",
    "core.hooksPath=/dev/null",
    "core.attributesFile=/dev/null",
    "diff.external=",
    "gpg.program=false",
    "gpg.ssh.program=false",
    "gpg.x509.program=false",
    "log.mailmap=false",
    "protocol.allow=never",
)
_GIT_LOG = (
    "--no-pager",
    *(arg for setting in _SAFE_CONFIG for arg in ("-c", setting)),
    "log",
    "--all",
    "--reflog",
    "--patch",
    "--cc",
    "--text",
    "--unified=0",
    "--no-color",
    "--no-ext-diff",
    "--no-textconv",
    "--no-show-signature",
    "--no-renames",
    "--src-prefix=a/",
    "--dst-prefix=b/",
    "--format=commit %H",
)
_SKIPPED_DIRS = frozenset({".git"})
MAX_PIECE = 1 << 20
"""Bytes read at a time: a 300 MB line (a minified bundle, a log without newlines) is scanned
in pieces of this size, so memory stays bounded whatever the input."""
_OVERLAP = KEY_LENGTH - 1


class ScanError(Exception):
    """The scan could not run (unreadable path, not a git repository); one line."""


@dataclass(frozen=True, slots=True)
class Sighting:
    """A checksum-valid key seen somewhere: its hash and mask, never the key itself."""

    key_hash: bytes
    mask: str
    location: str


@dataclass(frozen=True, slots=True)
class Finding:
    """A sighting, identified: which key, whose, and whether it still authorizes requests."""

    mask: str
    location: str
    key_id: str | None
    workspace_id: str | None
    active: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "mask": self.mask,
            "location": self.location,
            "key_id": self.key_id,
            "workspace_id": self.workspace_id,
            "active": self.active,
        }


def _sightings(text: str, location: str) -> Iterator[Sighting]:
    for _, key in find_keys(text):
        yield Sighting(hash_key(key), mask_key(key), location)


def _pieces(stream: IO[bytes], encoding: str) -> Iterator[tuple[bool, str]]:
    """Each line in pieces of at most MAX_PIECE bytes: (starts_a_line, text).

    A continuation piece begins with the previous piece's last KEY_LENGTH - 1 characters, so a
    key split between two pieces is still seen whole (a key seen twice is reported once).
    """
    starts, tail = True, ""
    while chunk := stream.readline(MAX_PIECE):
        text = chunk.decode(encoding, "replace")
        yield starts, text if starts else tail + text
        tail = text[-_OVERLAP:]
        starts = chunk.endswith(b"\n")


# Files and logs


def _files(path: Path) -> Iterator[Path]:
    if not path.is_dir():
        yield path
        return
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        for name in sorted(files):
            candidate = Path(folder) / name
            if not candidate.is_symlink():
                yield candidate


def scan_paths(paths: Iterable[Path]) -> Iterator[Sighting]:
    """Keys in these files (folders recursively, `.git` skipped), as `file:line`."""
    for root in paths:
        if not root.exists():
            raise ScanError(f"no such file or folder: {root}")
        for path in _files(root):
            try:
                with path.open("rb") as handle:
                    # latin-1 maps every byte to one character: binary files and logs in any
                    # encoding read without errors, and keys are ASCII either way.
                    number = 0
                    for starts, text in _pieces(handle, "latin-1"):
                        number += starts
                        yield from _sightings(text, f"{path}:{number}")
            except OSError as error:
                raise ScanError(f"cannot read {path}: {error.strerror}") from None


# Git history


def _unquote(path: str) -> str:
    """A path as git prints it: C-quoted when it holds special characters."""
    if not (len(path) >= 2 and path[0] == path[-1] == '"'):
        return path
    # Octal escapes stand for the path's UTF-8 bytes: undo them at the byte level.
    raw = path[1:-1].encode("utf-8").decode("unicode_escape")
    return raw.encode("latin-1").decode("utf-8", "replace")


def _new_path(header: str) -> str | None:
    target = _unquote(header[4:].rstrip("\t"))
    if target == "/dev/null":
        return None
    return target[2:] if target.startswith("b/") else target


class _DiffReader:
    """Follows `git log -p --cc` output and yields the keys on added lines."""

    def __init__(self) -> None:
        self.commit = ""
        self.path: str | None = None
        self.in_hunk = False
        self.parents = 1
        self.line = 0
        self.adding: str | None = None  # where the added line being read is, if it is one

    def feed(self, line: str) -> Iterator[Sighting]:
        self.adding = None
        if line.startswith("commit "):
            self.commit, self.path, self.in_hunk = line[7:].strip(), None, False
        elif line.startswith("diff "):
            self.path, self.in_hunk = None, False
        elif line.startswith("@@"):
            self._hunk(line)
        elif self.in_hunk:
            yield from self._content(line)
        elif line.startswith("+++ "):
            self.path = _new_path(line)

    def _hunk(self, line: str) -> None:
        match = _HUNK.match(line)
        if match is None:
            self.in_hunk = False
            return
        self.parents = len(match.group(1)) - 1
        new_range = match.group(2).split()[-1]  # "+start[,count]": the commit's own version
        self.line = int(new_range.lstrip("+").split(",")[0])
        self.in_hunk = True

    def _content(self, line: str) -> Iterator[Sighting]:
        marks, text = line[: self.parents], line[self.parents :]
        if "-" in marks or line.startswith("\\"):
            return  # only in a parent, or "\ No newline at end of file"
        number = self.line
        self.line += 1
        if "+" in marks and self.path is not None:
            self.adding = f"{self.commit[:12]}:{self.path}:{number}"
            yield from _sightings(text, self.adding)

    def more(self, piece: str) -> Iterator[Sighting]:
        """The rest of a line too long to read at once (see `_pieces`)."""
        if self.adding is not None:
            yield from _sightings(piece, self.adding)


def _git_env(home: str) -> dict[str, str]:
    """No inherited GIT_* variables, no system or user config, an empty HOME, no prompts."""
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": home,
        "XDG_CONFIG_HOME": home,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_ATTR_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_OPTIONAL_LOCKS": "0",
        "GIT_NO_REPLACE_OBJECTS": "1",
        "LC_ALL": "C",
    }


def scan_git(repo: Path) -> Iterator[Sighting]:
    """Keys added by any commit reachable from any ref or the reflog, as `commit:file:line`."""
    git = shutil.which("git")
    if git is None:
        raise ScanError("git is not installed: cannot scan history")
    if not repo.is_dir():
        raise ScanError(f"no such folder: {repo}")
    with (
        tempfile.TemporaryDirectory(prefix="authz-scan-home-") as home,
        tempfile.TemporaryFile() as errors,
        subprocess.Popen(  # noqa: S603 - git from PATH, arguments we build
            [git, "-C", str(repo), *_GIT_LOG],
            stdout=subprocess.PIPE,
            stderr=errors,
            stdin=subprocess.DEVNULL,
            env=_git_env(home),
        ) as process,
    ):
        try:
            yield from _read_log(process.stdout)
        finally:
            if process.poll() is None:
                process.kill()
            code = process.wait()
        if code != 0:
            errors.seek(0)
            detail = errors.read().decode("utf-8", "replace").strip().splitlines()
            raise ScanError(f"git log failed in {repo}: {detail[0] if detail else code}")


def _read_log(stream: IO[bytes] | None) -> Iterator[Sighting]:
    assert stream is not None
    reader = _DiffReader()
    for starts, text in _pieces(stream, "utf-8"):
        yield from (reader.feed if starts else reader.more)(text.rstrip("\n"))


# Identification


def _live(key: ApiKey, now: datetime) -> bool:
    return key.revoked_at is None and (key.expires_at is None or key.expires_at > now)


async def identify(sightings: Sequence[Sighting], store: Store, *, now: datetime) -> list[Finding]:
    """One finding per key and location, each looked up once by hash."""
    keys: dict[bytes, ApiKey | None] = {}
    findings: dict[tuple[bytes, str], Finding] = {}
    for sighting in sightings:
        if sighting.key_hash not in keys:
            keys[sighting.key_hash] = await store.get_key_by_hash(sighting.key_hash)
        key = keys[sighting.key_hash]
        findings.setdefault(
            (sighting.key_hash, sighting.location),
            Finding(
                mask=sighting.mask,
                location=sighting.location,
                key_id=None if key is None else key.id,
                workspace_id=None if key is None else key.workspace_id,
                active=key is not None and _live(key, now),
            ),
        )
    return list(findings.values())
