"""``[metrics]``: the Prometheus exporter (loopback only) and the textfile.

``parse_listen`` is the one check of a listen address: ``config check`` and
the exporter's ``serve`` both use it, so a file that passes the check starts.
``textfile`` is a ``.prom`` file for node_exporter's textfile collector, for
hosts that would rather not open one more scrape target.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import PurePosixPath

from oomguard.config.table import Table
from oomguard.config.values import ConfigError


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9464"  # "" turns the exporter off
    top_comms: int = 20
    textfile: str = ""  # "" writes none
    textfile_interval: float = 15.0


def parse_listen(listen: str, key: str = "metrics.listen") -> tuple[str, int]:
    """(host, port) for a loopback listen address; ConfigError otherwise."""
    host, sep, port_s = listen.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 <= int(port_s) < 65536:
        raise ConfigError(f"{key}: expected host:port, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ConfigError(f"{key}: {listen!r} has no host; use 127.0.0.1:{port_s}")
    try:
        addrs = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except socket.gaierror as e:
            raise ConfigError(f"{key}: cannot resolve {host!r}: {e.strerror}") from None
        addrs = {ipaddress.ip_address(info[4][0]) for info in infos}
    bad = sorted(str(a) for a in addrs if not a.is_loopback)
    if bad or not addrs:
        raise ConfigError(
            f"{key}: {host} is not a loopback address ({', '.join(bad)}); oomguard serves metrics on "
            "loopback only -- scrape through a reverse proxy or an SSH tunnel"
        )
    return host, int(port_s)


def check_textfile(path: str, key: str = "metrics.textfile") -> str:
    """An absolute ``NAME.prom`` path that is not a directory; node_exporter
    reads only ``*.prom`` files, so another name would never be served."""
    if "\0" in path or "\n" in path:
        raise ConfigError(f"{key}: {path!r} has a NUL or newline in it")
    p = PurePosixPath(path)
    if not p.is_absolute():
        raise ConfigError(f"{key}: {path!r} is not an absolute path")
    if p.suffix != ".prom" or p.name.startswith("."):
        raise ConfigError(
            f"{key}: {path!r} must be a NAME.prom file (node_exporter's textfile collector "
            "reads only those), e.g. /var/lib/prometheus/node-exporter/oomguard.prom"
        )
    if ".." in p.parts:
        raise ConfigError(f"{key}: {path!r} has a '..' in it")
    if os.path.isdir(path):
        raise ConfigError(f"{key}: {path} is a directory; name the file in it, e.g. {p / 'oomguard.prom'}")
    return path


def parse_metrics(t: Table) -> MetricsConfig:
    listen = t.get("listen", kind=str)
    if listen:
        _host, port = parse_listen(listen, t.k("listen"))
        if port == 0:
            raise ConfigError(f"{t.k('listen')}: port 0 picks a random port; name one, e.g. 9464")
    textfile = t.get("textfile", kind=str)
    if textfile:
        check_textfile(textfile, t.k("textfile"))
    interval = t.duration("textfile_interval")
    if not 1.0 <= interval <= 3600.0:
        raise ConfigError(f"{t.k('textfile_interval')}: must be between 1s and 1h, got {interval:g}s")
    cfg = MetricsConfig(
        listen=listen,
        top_comms=t.bounded_int("top_comms", 1, 1000),
        textfile=textfile,
        textfile_interval=interval,
    )
    t.done()
    return cfg
