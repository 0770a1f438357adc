"""Everything oomguard reads from or writes to the cgroup v2 filesystem.

Cgroups are named by their path relative to the mount point, with a leading
slash, exactly as /proc/<pid>/cgroup shows them ("/oomguard.app/run-7").
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

ROOT = Path(os.environ.get("OOMGUARD_CGROUP_ROOT", "/sys/fs/cgroup"))


class CgroupError(OSError):
    pass


def path(cgroup: str) -> Path:
    """The directory of a cgroup; refuses paths that climb out of the mount."""
    rel = cgroup.strip("/")
    if any(part in ("..", ".") for part in rel.split("/")):
        raise CgroupError(errno.EINVAL, f"bad cgroup path {cgroup!r}")
    return ROOT / rel if rel else ROOT


def normalize(cgroup: str) -> str:
    return "/" + cgroup.strip("/")


def join(parent: str, child: str) -> str:
    return normalize(f"{parent.rstrip('/')}/{child}")


def systemd_booted() -> bool:
    """sd_booted(): systemd is PID 1 and manages the cgroup tree."""
    return os.path.isdir("/run/systemd/system")


def slice_path(slice_name: str) -> str:
    """The cgroup path of a systemd slice: dashes nest ("a-b.slice" is
    /a.slice/a-b.slice), which is where the slice's processes show up."""
    stem = slice_name.removesuffix(".slice")
    if not stem or stem == "-":
        return "/"
    parts = stem.split("-")
    return "/" + "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def app_group(slice_name: str, plain_cgroup: str, systemd: bool | None = None) -> str:
    """Where the app user's processes live: the slice under systemd, the
    plain cgroup oomguard made itself elsewhere."""
    if systemd_booted() if systemd is None else systemd:
        return slice_path(slice_name)
    return normalize(plain_cgroup)


def is_v2() -> bool:
    return (ROOT / "cgroup.controllers").exists()


def exists(cgroup: str) -> bool:
    return path(cgroup).is_dir()


def _gone(e: OSError) -> OSError:
    """A cgroup being removed (its scope stopped by systemd, its run ended)
    answers ENODEV to a file opened a moment before: that is "gone" too."""
    if e.errno == errno.ENODEV:
        return FileNotFoundError(errno.ENOENT, f"cgroup removed: {e.strerror}", e.filename)
    return e


def _read(cgroup: str, name: str) -> str:
    try:
        return (path(cgroup) / name).read_text()
    except OSError as e:
        raise _gone(e) from None


def _write(cgroup: str, name: str, value: str) -> None:
    try:
        fd = os.open(path(cgroup) / name, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise _gone(e) from None


def read_flat_keyed(cgroup: str, name: str) -> dict[str, int]:
    """Files like memory.events or cgroup.events: "key value" lines."""
    out: dict[str, int] = {}
    try:
        text = _read(cgroup, name)
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def controllers(cgroup: str) -> set[str]:
    try:
        return set(_read(cgroup, "cgroup.controllers").split())
    except FileNotFoundError:
        return set()


def subtree_control(cgroup: str) -> set[str]:
    try:
        return set(_read(cgroup, "cgroup.subtree_control").split())
    except FileNotFoundError:
        return set()


def enable_controllers(cgroup: str, names: list[str]) -> None:
    """Enable controllers for the children of ``cgroup``."""
    missing = [n for n in names if n not in subtree_control(cgroup)]
    if missing:
        _write(cgroup, "cgroup.subtree_control", " ".join(f"+{n}" for n in missing))


def create(cgroup: str, mode: int = 0o755, *, exist_ok: bool = True) -> None:
    try:
        path(cgroup).mkdir(mode=mode)
    except FileExistsError:
        if not exist_ok:
            raise


def procs(cgroup: str) -> list[int]:
    try:
        return [int(x) for x in _read(cgroup, "cgroup.procs").split()]
    except FileNotFoundError:
        return []


def move(pid: int, cgroup: str) -> None:
    _write(cgroup, "cgroup.procs", str(pid))


def populated(cgroup: str) -> bool:
    events = read_flat_keyed(cgroup, "cgroup.events")
    if "populated" in events:
        return bool(events["populated"])
    return bool(procs(cgroup))


def kill(cgroup: str) -> None:
    """SIGKILL every process in the cgroup and below it (cgroup.kill, 5.14+);
    on older kernels, signal the listed processes one by one."""
    try:
        _write(cgroup, "cgroup.kill", "1")
        return
    except FileNotFoundError:
        if not exists(cgroup):
            return
    for pid in procs_recursive(cgroup):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def freeze(cgroup: str, timeout: float = 1.0) -> bool:
    """Freeze the cgroup and its subtree (cgroup.freeze), waiting up to
    ``timeout`` for the kernel to say it is frozen: then nothing in it can
    fork until ``thaw``, while SIGKILL still ends its processes. False
    where the kernel has no freezer (before 5.2) or it did not settle."""
    try:
        _write(cgroup, "cgroup.freeze", "1")
    except OSError:
        return False
    deadline = time.monotonic() + timeout
    while not read_flat_keyed(cgroup, "cgroup.events").get("frozen"):
        if time.monotonic() >= deadline or not exists(cgroup):
            return False
        time.sleep(0.005)
    return True


def thaw(cgroup: str) -> None:
    try:
        _write(cgroup, "cgroup.freeze", "0")
    except OSError:
        pass  # gone with its processes


def procs_recursive(cgroup: str) -> list[int]:
    out: list[int] = []
    base = path(cgroup)
    for dirpath, _dirs, _files in os.walk(base):
        rel = "/" + str(Path(dirpath).relative_to(ROOT)) if Path(dirpath) != ROOT else "/"
        out.extend(procs(rel))
    return out


def wait_empty(cgroup: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while populated(cgroup):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def remove(cgroup: str) -> bool:
    """rmdir an empty cgroup and its empty children; False if still busy."""
    base = path(cgroup)
    if not base.is_dir():
        return True
    for dirpath, _dirs, _files in sorted(os.walk(base), key=lambda t: -len(t[0])):
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno == errno.EBUSY:
                return False
            raise
    return True


# ---------------------------------------------------------------- memory


def _int_or_max(text: str) -> int | None:
    text = text.strip()
    return None if text == "max" else int(text)


def memory_current(cgroup: str) -> int | None:
    try:
        return int(_read(cgroup, "memory.current"))
    except (FileNotFoundError, ValueError):
        return None


def memory_max(cgroup: str) -> int | None:
    """memory.max in bytes, None for "max" or no memory controller."""
    try:
        return _int_or_max(_read(cgroup, "memory.max"))
    except (FileNotFoundError, ValueError):
        return None


def memory_peak(cgroup: str) -> int | None:
    try:
        return int(_read(cgroup, "memory.peak"))
    except (FileNotFoundError, ValueError):
        return None


def set_memory_max(cgroup: str, limit: int | None) -> None:
    _write(cgroup, "memory.max", "max" if limit is None else str(limit))


def set_memory_budget(cgroup: str, limit: int) -> None:
    """memory.max, and memory.swap.max 0 where swap is accounted: a budget
    the cgroup cannot stretch by swapping."""
    set_memory_max(cgroup, limit)
    try:
        _write(cgroup, "memory.swap.max", "0")
    except FileNotFoundError:
        pass  # no swap accounting here: the kernel cannot bound its swap


def memory_events(cgroup: str) -> dict[str, int]:
    """memory.events: low, high, max, oom, oom_kill (and oom_group_kill)."""
    return read_flat_keyed(cgroup, "memory.events")


def pressure(cgroup: str, resource: str = "memory") -> str | None:
    try:
        return _read(cgroup, f"{resource}.pressure")
    except FileNotFoundError:
        return None


def lineage(cgroup: str) -> list[str]:
    """The cgroup and each of its parents up to (not including) the root,
    innermost first: [] for the root."""
    parts = [p for p in cgroup.strip("/").split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(len(parts), 0, -1)]


def effective_memory_limit(cgroup: str) -> int | None:
    """The tightest memory.max on the way from the cgroup to the root: the
    limit an OOM in this cgroup's subtree is scaled by."""
    limits = [x for cg in lineage(normalize(cgroup)) if (x := memory_max(cg)) is not None]
    return min(limits, default=None)


def unit_of(cgroup: str | None, *, check_owner: bool = True) -> str | None:
    """The innermost systemd unit (service or scope) that the system's
    manager placed ``cgroup`` in.

    Names below a user's own manager (``user@UID.service``) or inside a
    cgroup a user owns (a delegated subtree) are chosen by that user, so they
    do not count: a cgroup named ``.../user@1000.service/app.slice/
    shop-queue.service`` is in ``user@1000.service``. ``check_owner`` stats
    each level (False: the path alone decides, for paths not on this host)."""
    if not cgroup:
        return None
    unit = None
    path = ROOT
    for part in cgroup.strip("/").split("/"):
        if not part:
            continue
        path = path / part
        if check_owner and _owned_by_a_user(path):
            break
        if part.endswith((".service", ".scope")):
            unit = part
        if part.startswith("user@") and part.endswith(".service"):
            break
    return unit


def owner(cgroup: str) -> int | None:
    """The uid owning the cgroup's directory; None if it is gone."""
    try:
        return os.stat(path(cgroup), follow_symlinks=False).st_uid
    except FileNotFoundError:
        return None


def under_a_user_owned(cgroup: str) -> bool:
    """Whether a proper ancestor of ``cgroup`` is owned by a user (delegated):
    its processes can then be moved to a sibling the user makes."""
    return any(_owned_by_a_user(ROOT / cg.lstrip("/")) for cg in lineage(cgroup)[1:])


def _owned_by_a_user(path: Path) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_uid != 0
    except FileNotFoundError:
        return False  # gone (or not on this host): no evidence of delegation


def swap_max(cgroup: str) -> int | None:
    """memory.swap.max in bytes; None for "max" or no such file."""
    try:
        return _int_or_max(_read(cgroup, "memory.swap.max"))
    except (OSError, ValueError):
        return None


def children(cgroup: str = "/") -> list[str]:
    """The direct child cgroups, as cgroup paths."""
    base = path(cgroup)
    try:
        names = sorted(e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []
    return [join(cgroup, n) for n in names]


def kernel_offers(name: str) -> bool:
    """Whether the kernel has the interface file ``name`` (cgroup.kill,
    memory.swap.max, ...): at the root or in a child of it, since some exist
    only below the root."""
    return (path("/") / name).exists() or any((path(c) / name).exists() for c in children("/"))
