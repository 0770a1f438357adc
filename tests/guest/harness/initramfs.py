"""Build the guest initramfs: a ``newc`` cpio written in pure Python.

Contents: a static busybox, the kernel modules needed to reach the host root
(virtio_pci, 9pnet_virtio, 9p, overlay and their ``depends=``), the list of
modules to load in order (``/etc/modules``), ``/dev/console`` and ``/init``
(``init.sh`` next to this file).  The archive is uncompressed (faster to unpack
under TCG) and cached under ``<cache>/initramfs/<sha256>.cpio``, keyed by its
content, so a changed init script or kernel yields a new file automatically.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import struct
import tempfile
from pathlib import Path

from .kernel import INSTALL_HINT, KernelError, cache_dir, module_bytes, modules_dir, resolve_modules

BASE_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]
INIT_SCRIPT = Path(__file__).with_name("init.sh")


class CpioWriter:
    """Minimal ``newc`` (SVR4, no CRC) archive writer; deterministic output."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.ino += 1
        self.chunks.append(self._pad(header + name.encode() + b"\0"))
        if data:
            self.chunks.append(self._pad(data))

    @staticmethod
    def _pad(blob: bytes) -> bytes:
        return blob + b"\0" * (-len(blob) % 4)

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.chunks)


def find_busybox() -> Path:
    for candidate in (os.environ.get("OOMGUARD_GUEST_BUSYBOX"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and Path(candidate).is_file():
            path = Path(candidate)
            if _is_static(path.read_bytes()):
                return path
            raise KernelError(
                f"{path} is dynamically linked; the guest needs busybox-static ({INSTALL_HINT})"
            )
    raise KernelError(f"busybox not found; {INSTALL_HINT}")


def _is_static(elf: bytes) -> bool:
    """True if the ELF64 binary has no PT_INTERP program header."""
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return all(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def build_initramfs(vmlinux: Path, extra_modules: list[str] | tuple[str, ...] = ()) -> Path:
    """Return a cached initramfs for ``vmlinux`` (building it if needed)."""
    moddir = modules_dir(vmlinux)
    modules = resolve_modules(moddir, BASE_MODULES + list(extra_modules))
    cpio = CpioWriter()
    for d in (
        "bin",
        "dev",
        "etc",
        "host",
        "lib",
        "lib/modules",
        "newroot",
        "ovl",
        "proc",
        "sys",
        "tmp",
    ):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", find_busybox().read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    names = []
    for path in modules:
        name = path.name.split(".ko")[0]
        names.append(name)
        cpio.file(f"lib/modules/{name}.ko", module_bytes(path))
    cpio.file("etc/modules", ("\n".join(names) + "\n").encode())
    cpio.file("etc/kernel-release", (moddir.name + "\n").encode())
    cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    blob = cpio.finish()

    digest = hashlib.sha256(blob).hexdigest()[:24]
    out = _initramfs_dir() / f"{digest}.cpio"
    if out.is_file():
        with contextlib.suppress(OSError):
            os.utime(out)  # mark as recently used for _prune()
    else:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".build-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        _prune(out.parent)
    return out


def _initramfs_dir() -> Path:
    """``<cache>/initramfs``, or a per-user temp dir if the cache is read-only."""
    for d in (
        cache_dir() / "initramfs",
        Path(tempfile.gettempdir()) / f"oomguard-guest-{os.getuid()}",
    ):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            pass
    raise KernelError("no writable directory for the initramfs")


def _prune(d: Path, keep: int = 8) -> None:
    """Delete all but the ``keep`` newest initramfs images."""
    images = sorted(d.glob("*.cpio"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[keep:]:
        old.unlink(missing_ok=True)
