"""The user and group databases, and the login range from /etc/login.defs.

The one place that calls ``pwd`` and ``grp``: everything else asks here by
name or id, and gets None for an unknown one rather than a KeyError.
"""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

LOGIN_DEFS = Path("/etc/login.defs")
# Debian's UID_MIN/UID_MAX when login.defs leaves them unset.
DEFAULT_LOGIN_RANGE = (1000, 60000)


def uid_of(name: str) -> int | None:
    """The uid of a user name, None if there is no such user."""
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def gid_of(name: str) -> int | None:
    """The gid of a group name, None if there is no such group."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def primary_gid(name: str) -> int | None:
    """The login group of a user name, None if there is no such user."""
    try:
        return pwd.getpwnam(name).pw_gid
    except KeyError:
        return None


def name_of(uid: int) -> str | None:
    """The user name of a uid, None if the uid has no entry."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def groups_of(uid: int) -> set[int]:
    """The uid's primary and supplementary gids; empty for an unknown uid."""
    try:
        pw = pwd.getpwuid(uid)
        return set(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except (KeyError, OverflowError, OSError):
        return set()


def exists(name: str) -> bool:
    return uid_of(name) is not None


class UserNames:
    """uid -> name for tables, cached per instance; an unknown uid shows as
    its number, as ``ps`` does."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def __call__(self, uid: int) -> str:
        name = self._names.get(uid)
        if name is None:
            name = name_of(uid) or str(uid)
            self._names[uid] = name
        return name


def login_uid_range(login_defs: Path = LOGIN_DEFS) -> tuple[int, int]:
    """(UID_MIN, UID_MAX) of regular login users, Debian's defaults if unset."""
    lo, hi = DEFAULT_LOGIN_RANGE
    try:
        text = login_defs.read_text(errors="replace")
    except OSError:
        return lo, hi
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            if parts[0] == "UID_MIN":
                lo = int(parts[1])
            elif parts[0] == "UID_MAX":
                hi = int(parts[1])
    return lo, hi
