"""Who is on the other end of a connection, as the kernel says, and whether
that user may ask.

The identity is SO_PEERCRED, SO_PEERGROUPS and (Linux 6.5+) SO_PEERPIDFD,
never anything the peer sends. At accept the peer is pinned (host/pidfd.py's
``Pinned``: a pidfd, then an fd on /proc/<pid>, then a check that the pidfd
is still alive), and a process that started after the accept is refused: it
is a reused pid, not the peer.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

from oomguard.config import ProtectConfig, login_uid_range
from oomguard.host import procfs, users
from oomguard.host.pidfd import Pinned

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
SO_PEERPIDFD = 77  # Linux 6.5+
GONE = "the requesting process is gone"
NOT_THE_PEER = "the requesting process is not the one that connected"


def user_name(uid: int) -> str:
    return users.name_of(uid) or str(uid)


@dataclass
class Peer:
    """A connected process as the kernel describes it."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]
    accepted: float  # CLOCK_BOOTTIME seconds, the clock of stat's starttime
    peer_pidfd: int | None = None  # SO_PEERPIDFD, adopted by the pin
    pinned: Pinned | None = None
    pin_error: str | None = None  # why the process could not be pinned

    @property
    def user(self) -> str:
        return user_name(self.uid)

    @property
    def pidfd(self) -> int | None:
        return self.pinned.pidfd if self.pinned else None

    @property
    def dirfd(self) -> int | None:
        return self.pinned.dirfd if self.pinned else None

    def close(self) -> None:
        if self.pinned is not None:
            self.pinned.close()
            self.pinned = None
        if self.peer_pidfd is not None:
            _close(self.peer_pidfd)
            self.peer_pidfd = None


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...] = ()
    for size in (256, 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * size)
            groups = struct.unpack(f"{len(raw) // 4}I", raw)
            break
        except OSError as e:
            if e.errno != errno.ERANGE:
                break
    peer = Peer(pid=pid, uid=uid, gid=gid, groups=groups, accepted=procfs.since_boot())
    try:
        peer.peer_pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        peer.peer_pidfd = None
    return peer


def pin(peer: Peer) -> None:
    """Bind the peer to one process for the life of the connection; on
    failure ``pin_error`` says why and the grant refuses."""
    pidfd, peer.peer_pidfd = peer.peer_pidfd, None  # the pin owns it from here
    try:
        peer.pinned = Pinned.open(peer.pid, pidfd=pidfd)
    except OSError:  # NoSuchProcess included
        peer.pin_error = GONE
        return
    if peer.pinned.starttime > peer.accepted * procfs.CLK_TCK + 1:
        # Started after the connection was accepted: a reused pid, not the peer.
        peer.pin_error = NOT_THE_PEER


def is_allowed(cfg: ProtectConfig, peer: Peer, uid_range: tuple[int, int] | None = None) -> bool:
    """Root is not special: with CAP_SYS_RESOURCE it needs no broker, and
    without it (a container) the broker must not hand it what it lacks."""
    if cfg.allow_gids and (peer.gid in cfg.allow_gids or set(peer.groups) & cfg.allow_gids):
        return True
    if cfg.allow_uids is None:
        lo, hi = uid_range or login_uid_range()
        return lo <= peer.uid <= hi and not cfg.allow_gids
    return peer.uid in cfg.allow_uids


def refusal_text(cfg: ProtectConfig, peer: Peer) -> str:
    if cfg.allow_uids is None and not cfg.allow_gids:
        lo, hi = login_uid_range()
        return (
            f"user {peer.user} (uid {peer.uid}) may not request protection: by default only "
            f"regular login users (uid {lo}-{hi}) may; see [protect] allow_users"
        )
    return f"user {peer.user} (uid {peer.uid}) is not in [protect] allow_users or allow_groups"
