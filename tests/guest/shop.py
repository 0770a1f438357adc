"""A real web shop (nginx + php-fpm 8.2 + MariaDB) on loopback, for tests.

Everything lives under one base directory::

    BASE/shop.json      ports, cgroups and the marker token (read by the CLI)
    BASE/www/           index.php: reads the token from MariaDB over PDO
    BASE/mysql/         datadir, tmpdir, socket, pid file (owned by mysql)
    BASE/php-fpm/       php-fpm.conf, pid file
    BASE/nginx/         nginx.conf, pid file, the five *_temp_path dirs
    BASE/log/           every service's logs

Each service can be started *inside* a cgroup v2 directory: the child writes
"0" to the cgroup's cgroup.procs in a ``preexec_fn``, i.e. after fork() and
before exec(), so every page the service ever touches is charged there
(cgroup v2 doesn't move charges when a running process is moved).  The same
``preexec_fn`` sets oom_score_adj to 0, the way systemd would, so a service
restarted by a protected (-1000) healer doesn't inherit the protection.

nginx and php-fpm daemonize themselves (their parent exits once the sockets
are bound, so start-up errors come back as an exit status, and init reaps
them); mariadbd has no daemon mode: it runs as our child in its own session,
and a thread reaps it when it dies.

CLI (what a healer runs; see ``Shop.restart_argv``)::

    python3 tests/guest/shop.py start   --base DIR [--cgroup PATH] [--port N ...]
    python3 tests/guest/shop.py stop    --base DIR
    python3 tests/guest/shop.py restart NAME --base DIR      NAME: mariadbd|php-fpm|nginx
    python3 tests/guest/shop.py pids    --base DIR           prints JSON
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

MARKER = "OOMGUARD-SHOP-OK"
SERVICES = ("mariadbd", "php-fpm", "nginx")
# /proc/PID/comm of each service's processes
COMM = {"mariadbd": "mariadbd", "php-fpm": "php-fpm8.2", "nginx": "nginx"}

PHP_FPM = "php-fpm8.2"
NGINX = "/usr/sbin/nginx"
MARIADBD = "/usr/sbin/mariadbd"
SQL_DIR = Path("/usr/share/mysql")  # mariadb-install-db's system tables, Debian's path
BOOTSTRAP_SQL = ["mysql_system_tables.sql", "mysql_performance_tables.sql",
                 "mysql_system_tables_data.sql", "maria_add_gis_sp_bootstrap.sql"]

# Small files matter: in the guest the datadir is on tmpfs, so every file is
# RAM charged to the cgroup of whoever wrote it (and can't be swapped out).
INNODB_FILES = [
    "--innodb-log-file-size=8M",
    "--innodb-temp-data-file-path=ibtmp1:1M:autoextend",
    "--innodb-autoextend-increment=4",  # MiB; the default 64 would grow ibtmp1 to 65M
]
MARIADB_FLAGS = [
    *INNODB_FILES,
    "--bind-address=127.0.0.1",
    "--skip-name-resolve",
    "--performance-schema=OFF",
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-buffer-size=2M",
    "--key-buffer-size=1M",
    "--aria-pagecache-buffer-size=8M",
    "--max-connections=50",
]

INDEX_PHP = """<?php
header('Content-Type: text/plain');
$db = new PDO('mysql:host=127.0.0.1;port={db_port};dbname=shop', 'shop', 'shop',
              [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION, PDO::ATTR_TIMEOUT => 5]);
echo '{marker} ', $db->query('SELECT value FROM marker WHERE id = 1')->fetchColumn(), "\\n";
"""

# run by mariadbd --bootstrap; FLUSH PRIVILEGES loads the grant
# tables, without which CREATE USER fails in bootstrap mode (skip-grant-tables)
SCHEMA_SQL = """FLUSH PRIVILEGES;
CREATE DATABASE shop;
CREATE TABLE shop.marker (id INT PRIMARY KEY, value VARCHAR(64) NOT NULL) ENGINE=InnoDB;
INSERT INTO shop.marker VALUES (1, '{token}');
CREATE USER 'shop'@'127.0.0.1' IDENTIFIED BY 'shop';
GRANT SELECT ON shop.* TO 'shop'@'127.0.0.1';
"""

PHP_FPM_CONF = """[global]
pid = {base}/php-fpm/php-fpm.pid
error_log = {base}/log/php-fpm.log
daemonize = yes

[shop]
user = www-data
group = www-data
listen = 127.0.0.1:{fpm_port}
pm = static
pm.max_children = {max_children}
catch_workers_output = yes
"""

NGINX_CONF = """worker_processes {nginx_workers};
user www-data www-data;
pid {base}/nginx/nginx.pid;
error_log {base}/log/nginx-error.log;
events {{ worker_connections 128; }}
http {{
    access_log {base}/log/nginx-access.log;
    client_body_temp_path {base}/nginx/client_body;
    proxy_temp_path {base}/nginx/proxy;
    fastcgi_temp_path {base}/nginx/fastcgi;
    uwsgi_temp_path {base}/nginx/uwsgi;
    scgi_temp_path {base}/nginx/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {base}/www;
        index index.php;
        location ~ \\.php$ {{
            fastcgi_pass 127.0.0.1:{fpm_port};
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_param QUERY_STRING $query_string;
            fastcgi_param REQUEST_URI $request_uri;
            fastcgi_param SERVER_PROTOCOL $server_protocol;
        }}
    }}
}}
"""


def answers(port: int, expected_body: str, timeout: float = 2) -> bool:
    """Whether the shop on ``port`` answers 200 with ``expected_body`` in the
    page (http.client, not urllib: urllib would honour http_proxy)."""
    import http.client  # here: it costs the restart CLI ~0.3 s under TCG

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/index.php")
        resp = conn.getresponse()
        return resp.status == 200 and expected_body in resp.read().decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class ShopError(RuntimeError):
    pass


class Shop:
    def __init__(
        self,
        base: Path | str,
        *,
        port: int = 8080,
        db_port: int = 3307,
        fpm_port: int = 9000,
        cgroup: Path | str | Mapping[str, Path | str] | None = None,
        max_children: int = 4,
        nginx_workers: int = 1,
        oom_score_adj: int | None = 0,
    ):
        """``cgroup``: one directory for all services, or {service: directory}.
        ``oom_score_adj``: what each service starts with (None: inherit ours)."""
        self.base = Path(base).resolve()
        self.port, self.db_port, self.fpm_port = port, db_port, fpm_port
        if cgroup is None:
            cgroup = {}
        elif isinstance(cgroup, (str, Path)):
            cgroup = dict.fromkeys(SERVICES, cgroup)
        self.cgroups = {name: Path(path) for name, path in cgroup.items()}
        self.max_children = max_children
        self.nginx_workers = nginx_workers
        self.oom_score_adj = oom_score_adj
        self.token = os.urandom(8).hex()
        self._mariadbd: subprocess.Popen | None = None
        self.timings: dict[str, float] = {}

    # ---- state shared with the CLI --------------------------------------

    def _state(self) -> dict:
        return {
            "port": self.port,
            "db_port": self.db_port,
            "fpm_port": self.fpm_port,
            "cgroup": {name: str(path) for name, path in self.cgroups.items()},
            "max_children": self.max_children,
            "nginx_workers": self.nginx_workers,
            "oom_score_adj": self.oom_score_adj,
            "token": self.token,
        }

    @classmethod
    def load(cls, base: Path | str) -> Shop:
        """The shop that ``start()`` set up in ``base`` (from BASE/shop.json)."""
        state = json.loads((Path(base) / "shop.json").read_text())
        token = state.pop("token")
        shop = cls(base, **state)
        shop.token = token
        return shop

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/index.php"

    @property
    def expected_body(self) -> str:
        """What ``url`` answers: the marker and the token read from MariaDB."""
        return f"{MARKER} {self.token}"

    def restart_argv(self, name: str) -> list[str]:
        """A command (no shell) that restarts one service of this shop."""
        if name not in SERVICES:
            raise ValueError(f"unknown service {name!r}; one of {SERVICES}")
        # -I -S: stdlib only, no site-packages to scan (Python starts slowly under TCG)
        return [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "restart", name,
                "--base", str(self.base)]

    # ---- start / stop ---------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Set up (once) and start all three; return when the page answers.
        ``self.timings`` then says how long the set-up (mariadbd --bootstrap) and
        the services took, in seconds."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        for name in SERVICES:  # before anything: the clean-up below stops what holds them
            if _listen_inodes(self._port(name)):
                raise ShopError(f"{name}: 127.0.0.1:{self._port(name)} is already in use")
        self._setup(deadline)
        t1 = time.monotonic()
        try:
            for name in SERVICES:
                self.start_service(name, deadline - time.monotonic(), wait=False)
            self._wait_mariadb(deadline)
            while not self.healthy(timeout=max(0.5, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise ShopError(f"{self.url} did not answer {self.expected_body!r} "
                                    f"within {timeout} s\n{self._log_tails()}")
                time.sleep(0.1)
            t2 = time.monotonic()
            self.timings = {"setup": t1 - t0, "services": t2 - t1, "total": t2 - t0}
        except BaseException:
            with contextlib.suppress(ShopError):
                self.stop(timeout=10)  # leave nothing half-started behind
            raise

    def stop(self, timeout: float = 30) -> None:
        """Stop all three (front to back) and wait until none is left."""
        for name in reversed(SERVICES):
            self.stop_service(name, timeout)

    def restart(self, name: str, timeout: float = 60) -> None:
        self.stop_service(name, timeout / 2)
        self.start_service(name, timeout / 2)

    def start_service(self, name: str, timeout: float = 60, *, wait: bool = True) -> None:
        deadline = time.monotonic() + timeout
        port = self._port(name)
        if _listen_inodes(port):
            raise ShopError(f"{name}: 127.0.0.1:{port} is already in use")
        if name == "mariadbd":
            self._mariadbd = self._spawn(self._mariadbd_argv(), "mariadbd", log="mariadbd.out")
            # reap it the moment it dies: an OOM-killed mariadbd must not linger as our
            # zombie, which a healer looking at /proc would take for a live mariadbd
            threading.Thread(target=self._mariadbd.wait, daemon=True).start()
            if wait:
                self._wait_mariadb(deadline)
        else:
            # both daemonize: the parent exits once the listening socket is bound
            argv = ([PHP_FPM, "--fpm-config", str(self.base / "php-fpm/php-fpm.conf")]
                    if name == "php-fpm" else
                    [NGINX, "-p", str(self.base / "nginx"), "-c",
                     str(self.base / "nginx/nginx.conf"), "-e",
                     str(self.base / "log/nginx-error.log")])
            proc = self._spawn(argv, name, log=f"{name}.out")
            try:
                code = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "timeout"
            if code != 0:
                raise ShopError(f"{name} failed to start ({code})\n{self._log_tails(name)}")
            while not _listen_inodes(port):
                if time.monotonic() > deadline:
                    raise ShopError(f"{name} does not listen on {port}\n{self._log_tails(name)}")
                time.sleep(0.05)

    def stop_service(self, name: str, timeout: float = 30) -> None:
        """SIGTERM the master, wait for it, its workers and anything else of this
        service that still holds the port (orphaned workers); then SIGKILL."""
        master = self._master(name)
        victims = set(self._all_pids(name))
        first = signal.SIGTERM
        if name == "mariadbd" and master and not _mysql_greets(self.db_port):
            first = signal.SIGKILL  # it ignores SIGTERM until it is up; InnoDB recovers
        if master:
            _signal(master, COMM[name], first)
        else:
            for pid in victims:
                _signal(pid, COMM[name], first)
        left = self._wait_gone(name, victims, time.monotonic() + timeout)
        if left:
            for pid in left:
                _signal(pid, COMM[name], signal.SIGKILL)
            left = self._wait_gone(name, victims, time.monotonic() + 5)
            if left:
                raise ShopError(f"{name}: pids {sorted(left)} survive SIGKILL")
        self._pidfile(name).unlink(missing_ok=True)

    def _wait_gone(self, name: str, pids: set[int], deadline: float) -> set[int]:
        """Wait until none of pids nor any other process of name is left; return the rest."""
        while True:
            self._reap()
            left = {p for p in pids | set(self._all_pids(name)) if _alive(p, COMM[name])}
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)

    # ---- looking at it --------------------------------------------------

    def healthy(self, timeout: float = 2) -> bool:
        """Does the page answer 200 with the marker and the token from MariaDB?"""
        return answers(self.port, self.expected_body, timeout)

    def pids(self) -> dict[str, list[int]]:
        """Live pids: "mariadbd", "php-fpm" and "nginx" (the masters, [] or [pid])
        and "php-fpm-workers", "nginx-workers" (children of the master plus any
        orphaned worker still holding the listening socket)."""
        self._reap()
        out: dict[str, list[int]] = {}
        for name in SERVICES:
            master = self._master(name)
            out[name] = [master] if master else []
            if name != "mariadbd":
                out[f"{name}-workers"] = sorted(set(self._all_pids(name)) - {master})
        return out

    def logs(self) -> Path:
        return self.base / "log"

    # ---- internals ------------------------------------------------------

    def _port(self, name: str) -> int:
        return {"mariadbd": self.db_port, "php-fpm": self.fpm_port, "nginx": self.port}[name]

    def _pidfile(self, name: str) -> Path:
        return self.base / {"mariadbd": "mysql/mariadbd.pid", "php-fpm": "php-fpm/php-fpm.pid",
                            "nginx": "nginx/nginx.pid"}[name]

    def _master(self, name: str) -> int | None:
        if name == "mariadbd" and self._mariadbd is not None and self._mariadbd.poll() is None:
            pid = self._mariadbd.pid  # our child: known before it writes its pid file
        else:
            try:
                pid = int(self._pidfile(name).read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return None
        return pid if _alive(pid, COMM[name]) else None

    def _all_pids(self, name: str) -> list[int]:
        """Master, its children and whoever else of this comm holds the port."""
        master = self._master(name)
        sockets = {f"socket:[{inode}]" for inode in _listen_inodes(self._port(name))}
        return sorted(pid for pid, ppid in _live_procs(COMM[name]).items()
                      if master in (pid, ppid) or _holds(pid, sockets))

    def _reap(self) -> None:
        if self._mariadbd is not None and self._mariadbd.poll() is not None:
            self._mariadbd = None

    def _setup(self, deadline: float) -> None:
        base = self.base
        if len(str(base / "mysql/mariadbd.sock")) > 100:
            raise ShopError(f"base {base} is too long for a unix socket path")
        for path in base.parents:  # www-data and mysql must get through to base
            if path.exists() and not os.stat(path).st_mode & 0o001:
                raise ShopError(f"{path} is not searchable by others (www-data, mysql)")
        for name, path in self.cgroups.items():
            if name not in SERVICES or not (path / "cgroup.procs").is_file():
                raise ShopError(f"{name}: {path} is not a cgroup v2 directory")
        for sub in ("www", "php-fpm", "nginx", "log", "mysql/tmp"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        fresh = not (base / "mysql/bootstrapped").exists()
        if not fresh:
            self.token = json.loads((base / "shop.json").read_text())["token"]
        (base / "shop.json").write_text(json.dumps(self._state(), indent=1) + "\n")
        fmt = dict(self._state(), base=base)
        (base / "www/index.php").write_text(INDEX_PHP.replace("{db_port}", str(self.db_port))
                                            .replace("{marker}", MARKER))
        (base / "php-fpm/php-fpm.conf").write_text(PHP_FPM_CONF.format(**fmt))
        (base / "nginx/nginx.conf").write_text(NGINX_CONF.format(**fmt))
        mysql = pwd.getpwnam("mysql")
        for path in (base / "mysql", base / "mysql/tmp"):
            os.chown(path, mysql.pw_uid, mysql.pw_gid)
        err = base / "log/mariadbd.err"
        err.touch()
        os.chown(err, mysql.pw_uid, mysql.pw_gid)
        if fresh:
            self._bootstrap_db(deadline)

    def _bootstrap_db(self, deadline: float) -> None:
        """What mariadb-install-db does, minus the help tables and the sys schema
        (3 MB of SQL): 6 s instead of 16 s under TCG.  Not a service, so it runs
        in the caller's cgroup (and the datadir's tmpfs pages are charged there)."""
        data = self.base / "mysql/data"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir()
        mysql = pwd.getpwnam("mysql")
        os.chown(data, mysql.pw_uid, mysql.pw_gid)
        sql = "create database if not exists mysql;\nuse mysql;\nSET @auth_root_socket=NULL;\n"
        sql += "".join((SQL_DIR / name).read_text() for name in BOOTSTRAP_SQL)
        sql += SCHEMA_SQL.format(token=self.token)  # bootstrap: one statement per line
        argv = [MARIADBD, "--no-defaults", "--bootstrap", "--user=mysql", f"--datadir={data}",
                f"--tmpdir={self.base}/mysql/tmp", "--log-warnings=0", "--enforce-storage-engine=",
                "--max-allowed-packet=8M", "--net-buffer-length=16K", "--skip-name-resolve",
                *INNODB_FILES]
        log = self.base / "log/mariadb-bootstrap.log"
        with open(log, "wb") as out:
            try:
                code = subprocess.run(argv, input=sql.encode(), stdout=out, stderr=subprocess.STDOUT,
                                      timeout=max(1, deadline - time.monotonic())).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        if code != 0:
            raise ShopError(f"mariadbd --bootstrap failed ({code})\n--- {log}\n{_tail(log)}")
        (self.base / "mysql/bootstrapped").touch()

    def _mariadbd_argv(self) -> list[str]:
        b = self.base
        return [MARIADBD, "--no-defaults", "--user=mysql", f"--datadir={b}/mysql/data",
                f"--tmpdir={b}/mysql/tmp", f"--socket={b}/mysql/mariadbd.sock",
                f"--pid-file={b}/mysql/mariadbd.pid", f"--log-error={b}/log/mariadbd.err",
                f"--port={self.db_port}", *MARIADB_FLAGS]

    def _spawn(self, argv: list[str], name: str, log: str) -> subprocess.Popen:
        cgroup = self.cgroups.get(name)
        adj = self.oom_score_adj

        def in_child() -> None:  # after fork(), before exec()
            if cgroup is not None:
                with open(cgroup / "cgroup.procs", "w") as f:
                    f.write("0")
            if adj is not None:
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write(str(adj))

        with open(self.base / "log" / log, "ab") as out:
            try:
                return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=in_child)
            except subprocess.SubprocessError as e:  # the preexec_fn failed
                raise ShopError(f"{name}: cannot enter {cgroup} / set oom_score_adj={adj}: "
                                f"{e}") from e

    def _wait_mariadb(self, deadline: float) -> None:
        """Until mariadbd sends its handshake (it accepts only once fully up)."""
        while not _mysql_greets(self.db_port):
            self._reap()
            dead = self._mariadbd is None and not self._master("mariadbd")
            if dead or time.monotonic() > deadline:
                why = "exited" if dead else "did not answer in time"
                raise ShopError(f"mariadbd {why}\n{self._log_tails('mariadbd')}")
            time.sleep(0.1)

    def _log_tails(self, name: str | None = None) -> str:
        logs = sorted((self.base / "log").glob("*"))
        if name is not None:  # mariadbd.err, mariadb-bootstrap.log, php-fpm.log, ...
            logs = [p for p in logs if p.name.startswith(name.removesuffix("d"))]
        return "\n".join(f"--- {p}\n{_tail(p)}" for p in logs if p.stat().st_size)


# ---- /proc helpers ------------------------------------------------------


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"({e})"


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of a process, or None if it is gone."""
    return _stat_path(f"/proc/{pid}/stat")


def _stat_path(path: str) -> tuple[str, str, int] | None:
    try:
        data = Path(path).read_text()
    except OSError:
        return None
    comm = data[data.index("(") + 1:data.rindex(")")]
    state, ppid = data[data.rindex(")") + 2:].split()[:2]
    return comm, state, int(ppid)


def _alive(pid: int, comm: str) -> bool:
    """Is pid a live process named comm?  A "Z" main thread is not enough to be
    dead: mariadbd's main thread exits first while the others shut down."""
    st = _stat(pid)
    if st is None or st[0] != comm:
        return False
    if st[1] != "Z":
        return True
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any((t := _stat_path(f"/proc/{pid}/task/{tid}/stat")) and t[1] != "Z" for tid in tasks)


def _live_procs(comm: str) -> dict[int, int]:
    """{pid: ppid} of the live processes named comm."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) and st[0] == comm:
            if _alive(int(entry), comm):
                procs[int(entry)] = st[2]
    return procs


def _listen_inodes(port: int) -> set[str]:
    """Socket inodes listening on 127.0.0.1:port (or 0.0.0.0:port)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        addr, hexport = fields[1].split(":")
        if int(hexport, 16) == port and fields[3] == "0A" and addr in ("0100007F", "00000000"):
            inodes.add(fields[9])
    return inodes


def _holds(pid: int, sockets: set[str]) -> bool:
    """Has pid one of these open ("socket:[INODE]")?"""
    if not sockets:
        return False
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") in sockets
                   for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def _signal(pid: int, comm: str, sig: int) -> None:
    if _alive(pid, comm):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _mysql_greets(port: int) -> bool:
    """True once the server sends its protocol-10 handshake packet."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            head = s.recv(5)
    except OSError:
        return False
    return len(head) == 5 and head[4] == 10


# ---- CLI ----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="shop.py", description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=("start", "stop", "restart", "pids"))
    ap.add_argument("name", nargs="?", choices=SERVICES, help="service, for restart")
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--cgroup", type=Path, help="start: run every service inside it")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--db-port", type=int, default=3307)
    ap.add_argument("--fpm-port", type=int, default=9000)
    ap.add_argument("--max-children", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args(argv)
    try:
        if args.action == "start":
            shop = Shop(args.base, port=args.port, db_port=args.db_port,
                        fpm_port=args.fpm_port, cgroup=args.cgroup,
                        max_children=args.max_children)
            shop.start(args.timeout)
            print(shop.url)
            return 0
        shop = Shop.load(args.base)
        if args.action == "stop":
            shop.stop(args.timeout)
        elif args.action == "pids":
            print(json.dumps(shop.pids()))
        elif args.name is None:
            ap.error("restart needs a service name")
        else:
            shop.restart(args.name, args.timeout)
    except ShopError as e:
        print(f"shop.py {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
