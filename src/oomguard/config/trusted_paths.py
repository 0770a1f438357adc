"""Whether an exe glob of a privileged class names only binaries root controls.

A class that lowers oom_score_adj (or exempts from the healer) and matches an
exe lets anyone who can place a binary under a matching path take its value.
So such a glob must be an absolute path, or a glob whose directories are all
root's and writable by nobody else: the literal directory before the first
wildcard, each of its ancestors, and (since fnmatch's ``*`` and ``?`` also
match '/') every directory below it that the glob can reach.
"""

from __future__ import annotations

import os
import stat

from oomguard.config.values import GLOB_MAGIC, ConfigError

# A glob that spans more directories than this is too broad to trust (and to
# check at load time): "/*" or "/usr/*".
MAX_DIRS = 2000


def _unsafe(path: str) -> str | None:
    """Why another user could create or rename entries in ``path``, or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None  # absent: only whoever may write its parent can make it
    except OSError as e:
        return f"cannot be checked ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        # The kernel resolves /proc/PID/exe: no exe path runs through a link.
        return "is a symlink; name the directory it points to"
    if st.st_uid != 0:
        return f"is owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid != 0):
        return "is writable by other users"
    return None


def _ancestors(directory: str) -> list[str]:
    out, path = [], directory
    while True:
        out.append(path)
        if path == "/":
            return out[::-1]
        path = os.path.dirname(path)


def check_privileged_exe(glob: str, key: str) -> None:
    """ConfigError unless only root can place a binary that ``glob`` matches."""
    if not glob.startswith("/"):
        raise ConfigError(f"{key}: {glob!r} must be an absolute path: this class is privileged")
    parts = glob.split("/")
    wild = next((i for i, p in enumerate(parts) if any(c in p for c in GLOB_MAGIC)), None)
    if wild is None:
        return  # an exact path: one binary, named by root
    directory = "/".join(parts[:wild]) or "/"
    for d in _ancestors(os.path.normpath(directory)):
        if (why := _unsafe(d)) is not None:
            raise ConfigError(f"{key}: {glob!r} is privileged, but the directory {d} {why}")
    # Any wildcard may match a '/' (a class can hold one), so the glob reaches
    # every directory below.
    _check_below(directory, glob, key)


def _check_below(top: str, glob: str, key: str) -> None:
    def unreadable(e: OSError) -> None:
        if isinstance(e, FileNotFoundError):
            return  # absent, or gone while we walked: nothing to place a binary in
        raise ConfigError(f"{key}: {glob!r} is privileged, but {e.filename} cannot be checked ({e.strerror})")

    seen = 0
    for root, dirs, _files in os.walk(top, onerror=unreadable, followlinks=False):
        for name in dirs:
            seen += 1
            if seen > MAX_DIRS:
                raise ConfigError(
                    f"{key}: {glob!r} is privileged and spans more than {MAX_DIRS} directories under "
                    f"{top}: name the binaries"
                )
            d = os.path.join(root, name)
            if os.path.islink(d):
                continue  # /proc/PID/exe is resolved: no exe path runs through a link
            if (why := _unsafe(d)) is not None:
                raise ConfigError(f"{key}: {glob!r} is privileged, but the directory {d} {why}")
