"""The only door to the OS: /proc, cgroupfs, /dev/kmsg, netlink, systemd, users and state files."""
