"""Real-kernel test harness: run commands as root in a throw-away QEMU guest.

See tests/guest/README-less overview in vm.run_guest's docstring and
tests/guest/conftest.py for the pytest integration.
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
