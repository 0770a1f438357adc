"""Real-kernel test harness: run commands as root in a throw-away QEMU guest.

    kernel.py     ensure_kernel(): Debian's kernel, apt-get download-ed and unpacked
    initramfs.py  build_initramfs(): busybox + 9p/overlay modules + init.sh (newc cpio)
    init.sh       the guest's PID 1: assembles the root, runs the command, powers off
    vm.py         run_guest(): boots QEMU, runs one command as root, returns its status
    systemd.py    the systemd flavour (run_guest(flavour="systemd")): systemd as PID 1,
                  the command as oomguard-test.service in oomguard-test.target
    bridge.py     pytest across the boundary: one boot runs a directory's selected tests
    __main__.py   python3 -m tests.guest.harness [--mem MiB] [--timeout S] [--systemd] -- CMD ARGS...

tests/guest/conftest.py runs the pytest tests under tests/guest/ in one plain
guest; tests/systemd/conftest.py those under tests/systemd/ in one systemd guest.
"""

from .initramfs import build_initramfs
from .kernel import KernelError, cache_dir, ensure_kernel
from .vm import GUEST_FAILURE, GuestError, GuestResult, guest_env, kvm_usable, run_guest

__all__ = [
    "GUEST_FAILURE",
    "GuestError",
    "GuestResult",
    "KernelError",
    "build_initramfs",
    "cache_dir",
    "ensure_kernel",
    "guest_env",
    "kvm_usable",
    "run_guest",
]
