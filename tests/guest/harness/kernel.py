"""Fetch and unpack the Debian guest kernel; resolve kernel modules.

The kernel comes from the package that ``linux-image-amd64`` depends on.  It is
``apt-get download``-ed (never installed) into the cache directory and
unpacked with ``dpkg-deb -x``.  The uncompressed ``vmlinux`` is carved out of
``vmlinuz`` because QEMU can boot an ELF vmlinux directly through its PVH
entry point, which saves about 3 s of in-guest decompression under TCG.

Cache layout (``$OOMGUARD_GUEST_CACHE``, default ``/var/cache/oomguard-guest``)::

    lock                          flock(2) lock for fetches and builds
    kernel/<package>_<version>/   dpkg-deb -x tree, plus ``vmlinux``
    kernel/current -> <package>_<version>
    initramfs/<sha256>.cpio       see initramfs.py
"""

from __future__ import annotations

import contextlib
import fcntl
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

DEFAULT_CACHE = "/var/cache/oomguard-guest"
META_PACKAGE = "linux-image-amd64"
INSTALL_HINT = "run `scripts/install-test-deps` (as root) to install the guest dependencies"


class KernelError(RuntimeError):
    """The guest kernel is missing or could not be fetched/unpacked."""


def cache_dir() -> Path:
    return Path(os.environ.get("OOMGUARD_GUEST_CACHE") or DEFAULT_CACHE)


@contextlib.contextmanager
def cache_lock():
    """Serialise fetches/builds between concurrent harness users."""
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise KernelError(
            f"guest cache {root} is not writable ({exc}); {INSTALL_HINT}, "
            "or point OOMGUARD_GUEST_CACHE at a writable directory"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield root
    finally:
        os.close(fd)


def cached_kernel() -> Path | None:
    """The cached vmlinux, or None.  Never touches the network."""
    vmlinux = cache_dir() / "kernel" / "current" / "vmlinux"
    return vmlinux if vmlinux.is_file() else None


def ensure_kernel(*, refresh: bool = False) -> Path:
    """Return the path of an uncompressed guest vmlinux, fetching it if needed.

    Fast (no apt, no network) when a kernel is cached.  ``refresh=True``
    re-resolves ``linux-image-amd64`` and fetches a newer package if there is one.
    """
    if not refresh and (vmlinux := cached_kernel()):
        return vmlinux
    with cache_lock() as root:
        if not refresh and (vmlinux := cached_kernel()):
            return vmlinux  # somebody else fetched it while we waited
        return _fetch(root / "kernel")


def modules_dir(vmlinux: Path) -> Path:
    """``lib/modules/<release>`` belonging to an unpacked ``vmlinux``."""
    dirs = sorted((vmlinux.parent / "lib" / "modules").glob("*/kernel"))
    if len(dirs) != 1:
        raise KernelError(
            f"expected one lib/modules/<release>/kernel next to {vmlinux}, found {dirs}; {INSTALL_HINT}"
        )
    return dirs[0].parent


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise KernelError(
            f"{argv[0]} not found ({exc}); the guest kernel is fetched with apt on Debian 12"
        ) from exc
    if proc.returncode:
        raise KernelError(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}\n{INSTALL_HINT}"
        )
    return proc.stdout


def _kernel_package() -> tuple[str, str]:
    """(package, candidate version) of the kernel behind linux-image-amd64."""
    package = os.environ.get("OOMGUARD_GUEST_KERNEL_PACKAGE")
    if not package:
        out = _run(["apt-cache", "depends", META_PACKAGE])
        match = re.search(r"^\s*Depends:\s*(linux-image-\S+)", out, re.M)
        if not match:
            raise KernelError(f"cannot find the package behind {META_PACKAGE} in:\n{out}")
        package = match.group(1)
    out = _run(["apt-cache", "show", "--no-all-versions", package])
    match = re.search(r"^Version:\s*(\S+)", out, re.M)
    if not match:
        raise KernelError(f"apt-cache show {package} printed no version:\n{out}")
    return package, match.group(1)


def _fetch(kernels: Path) -> Path:
    package, version = _kernel_package()
    name = f"{package}_{version.replace(':', '%3a')}"
    final = kernels / name
    kernels.mkdir(parents=True, exist_ok=True)
    if not (final / "vmlinux").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=kernels))
        try:
            tmp.chmod(0o777)  # lets apt's _apt sandbox user write the .deb (else a warning)
            _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=tmp)
            debs = list(tmp.glob("*.deb"))
            if len(debs) != 1:
                raise KernelError(f"apt-get download {package} produced {debs}")
            tree = tmp / "tree"
            _run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
            vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
            if len(vmlinuz) != 1:
                raise KernelError(f"expected one boot/vmlinuz-* in {package}, found {vmlinuz}")
            extract_vmlinux(vmlinuz[0], tree / "vmlinux")
            modules_dir(tree / "vmlinux")  # sanity check
            if final.exists():
                shutil.rmtree(final)
            tree.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    link = kernels / ".current.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(name)
    link.replace(kernels / "current")
    for old in kernels.iterdir():  # unpacked kernels are ~400 MB each
        if old.is_dir() and not old.is_symlink() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return kernels / "current" / "vmlinux"


# --- vmlinuz -> vmlinux -------------------------------------------------------

_MAGICS = {
    b"\xfd7zXZ\x00": "xz",
    b"\x1f\x8b\x08": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
}


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    if kind == "gzip":
        return zlib.decompressobj(31).decompress(data)
    if shutil.which("zstd"):
        return subprocess.run(["zstd", "-dcq"], input=data, capture_output=True).stdout
    raise KernelError(
        "the kernel is zstd-compressed and the `zstd` tool is missing (apt-get install zstd)"
    )


def extract_vmlinux(vmlinuz: Path, out: Path) -> Path:
    """Write the ELF kernel embedded in a bzImage to ``out``."""
    data = vmlinuz.read_bytes()
    for magic, kind in _MAGICS.items():
        start = 0
        while (pos := data.find(magic, start)) >= 0:
            start = pos + 1
            try:
                elf = _decompress(kind, data[pos:])
            except (lzma.LZMAError, OSError, EOFError, zlib.error):
                continue
            if elf.startswith(b"\x7fELF"):
                tmp = out.with_name(out.name + ".tmp")
                tmp.write_bytes(elf)
                tmp.replace(out)
                return out
    raise KernelError(f"no xz/gzip/zstd stream holding an ELF image found in {vmlinuz}")


# --- modules ------------------------------------------------------------------

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def _mod_name(path: Path) -> str:
    name = path.name
    for suffix in _MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.replace("-", "_")


def module_bytes(path: Path) -> bytes:
    """A module's ELF bytes, decompressed if it is shipped compressed."""
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    for magic, kind in _MAGICS.items():
        if data.startswith(magic):
            return _decompress(kind, data)
    raise KernelError(f"unknown compression of {path}")


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """Parse the ``.modinfo`` section of an (uncompressed) ELF64 LE module."""
    if not elf.startswith(b"\x7fELF\x02\x01"):
        raise KernelError("not an ELF64 little-endian module")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize
        )
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, offset, size = section(i)
        if elf[stroff + name : elf.index(b"\0", stroff + name)] == b".modinfo":
            for entry in elf[offset : offset + size].split(b"\0"):
                key, sep, value = entry.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
    return info


def resolve_modules(moddir: Path, names: list[str]) -> list[Path]:
    """Module files for ``names`` plus their ``depends=``, dependencies first.

    Modules built into the kernel (``modules.builtin``) are silently dropped.
    """
    index = {
        _mod_name(p): p
        for p in (moddir / "kernel").rglob("*.ko*")
        if p.name.endswith(_MODULE_SUFFIXES)
    }
    builtin_file = moddir / "modules.builtin"
    builtin = (
        {_mod_name(Path(line)) for line in builtin_file.read_text().split()}
        if builtin_file.exists()
        else set()
    )
    ordered: list[Path] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if state.get(name) == "done" or name in builtin:
            return
        if state.get(name) == "visiting":
            raise KernelError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in index:
            raise KernelError(
                f"kernel module {name!r} (needed by {' -> '.join(chain) or 'harness'}) not in {moddir}"
            )
        state[name] = "visiting"
        deps = modinfo(module_bytes(index[name])).get("depends", [""])[0]
        for dep in filter(None, deps.split(",")):
            visit(dep, chain + (name,))
        state[name] = "done"
        ordered.append(index[name])

    for name in names:
        visit(name, ())
    return ordered
