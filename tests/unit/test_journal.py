"""host/journal.py against a real AF_UNIX datagram socket standing in for journald."""

from __future__ import annotations

import array
import fcntl
import io
import logging
import os
import socket
import struct

import pytest

from oomguard.host import journal


def parse(entry: bytes) -> list[tuple[str, bytes]]:
    """journald's side of the native protocol: the fields of one entry, in order."""
    fields, pos = [], 0
    while pos < len(entry):
        end = entry.index(b"\n", pos)
        line = entry[pos:end]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            pos = end + 1
        else:
            name = line
            (size,) = struct.unpack_from("<Q", entry, end + 1)
            start = end + 9
            value = entry[start : start + size]
            assert entry[start + size : start + size + 1] == b"\n"
            pos = start + size + 1
        fields.append((name.decode("ascii"), value))
    return fields


class FakeJournald:
    """A bound datagram socket: receives entries as journald would (datagram or memfd)."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(5)
        self.seals: list[int] = []

    def receive(self) -> list[tuple[str, bytes]]:
        fds = array.array("i")
        data, ancdata, _flags, _addr = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, blob in ancdata:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds.frombytes(blob[: len(blob) - len(blob) % fds.itemsize])
        if fds:
            assert data == b""
            fd = fds[0]
            self.seals.append(fcntl.fcntl(fd, fcntl.F_GET_SEALS))
            data = os.pread(fd, os.fstat(fd).st_size, 0)
            os.close(fd)
        return parse(data)

    def entry(self) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        for name, value in self.receive():
            out.setdefault(name, []).append(value)
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def journald(tmp_path):
    j = FakeJournald(str(tmp_path / "socket"))
    yield j
    j.close()


@pytest.fixture
def logger(journald):
    handler = journal.JournalHandler(journald.path, identifier="oomguard-test")
    log = logging.getLogger(f"oomguard.test.journal.{id(handler)}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    yield log
    log.removeHandler(handler)
    handler.close()


def test_a_record_arrives_with_message_priority_and_code_location(journald, logger):
    logger.warning("run %d ended", 7)
    entry = journald.entry()
    assert entry["MESSAGE"] == [b"run 7 ended"]
    assert entry["PRIORITY"] == [b"4"]
    assert entry["SYSLOG_IDENTIFIER"] == [b"oomguard-test"]
    assert entry["CODE_FILE"] == [__file__.encode()]
    assert entry["CODE_FUNC"] == [b"test_a_record_arrives_with_message_priority_and_code_location"]
    assert int(entry["CODE_LINE"][0]) > 0


@pytest.mark.parametrize(
    ("level", "prio"),
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
    ],
)
def test_levels_map_to_syslog_priorities(journald, logger, level, prio):
    logger.log(level, "x")
    assert journald.entry()["PRIORITY"] == [str(prio).encode()]


def test_event_fields_travel_with_the_record(journald, logger):
    data = {"id": 12, "uid": 1000, "user": "shop", "pid": 4242, "cgroup": "/oomguard.app/run-12",
            "command": "php import.php", "exit_status": None}  # fmt: skip
    logger.info("grant", extra={journal.EXTRA_ATTR: journal.event_fields("grant", data)})
    entry = journald.entry()
    assert entry["MESSAGE_ID"] == [journal.MESSAGE_IDS["grant"].encode()]
    assert entry["OOMGUARD_RUN_ID"] == [b"12"]
    assert entry["OOMGUARD_UID"] == [b"1000"]
    assert entry["OOMGUARD_CGROUP"] == [b"/oomguard.app/run-12"]
    assert entry["OOMGUARD_COMMAND"] == [b"php import.php"]
    assert "OOMGUARD_EXIT_STATUS" not in entry  # None is no value


def test_a_hostile_value_cannot_add_or_replace_fields(journald, logger):
    comm = "x\nMESSAGE_ID=00000000000000000000000000000000\nPRIORITY=0"
    fields = journal.event_fields("oom_kill", {"victim_pid": 9, "victim_comm": comm + "\0tail"})
    logger.warning("kill\nPRIORITY=0", extra={journal.EXTRA_ATTR: fields})
    entry = journald.entry()
    assert entry["OOMGUARD_VICTIM_COMM"] == [(comm + "\0tail").encode()]
    assert entry["MESSAGE_ID"] == [journal.MESSAGE_IDS["oom_kill"].encode()]
    assert entry["PRIORITY"] == [b"4"]
    assert entry["MESSAGE"] == [b"kill\nPRIORITY=0"]


def test_extra_fields_never_replace_message_or_priority(journald, logger):
    logger.error("real", extra={journal.EXTRA_ATTR: {"MESSAGE": "fake", "PRIORITY": "7"}})
    entry = journald.entry()
    assert (entry["MESSAGE"], entry["PRIORITY"]) == ([b"real"], [b"3"])


def test_non_utf8_bytes_arrive_unchanged(journald, logger):
    raw = "caf\udce9"  # a surrogate-escaped byte 0xe9, as os.fsdecode gives for a comm
    logger.info("m", extra={journal.EXTRA_ATTR: {"OOMGUARD_VICTIM_COMM": raw}})
    assert journald.entry()["OOMGUARD_VICTIM_COMM"] == [b"caf\xe9"]


def test_an_entry_too_big_for_a_datagram_goes_in_a_sealed_memfd(journald, logger):
    big = "a" * (4 << 20)  # more than any AF_UNIX datagram may carry
    logger.info("big", extra={journal.EXTRA_ATTR: {"OOMGUARD_COMMAND": big}})
    entry = journald.entry()
    assert entry["OOMGUARD_COMMAND"] == [big.encode()]
    want = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
    assert journald.seals == [want]


def test_without_journald_the_record_goes_to_the_fallback_stream(tmp_path):
    stream = io.StringIO()
    handler = journal.JournalHandler(str(tmp_path / "absent"), fallback=stream)
    handler.setFormatter(logging.Formatter("<%(levelname)s> %(message)s"))
    handler.handle(
        logging.LogRecord("oomguard", logging.WARNING, __file__, 1, "gone %s", ("x",), None)
    )
    assert stream.getvalue() == "<WARNING> gone x\n"


def test_make_handler_picks_the_journal_when_its_socket_exists(journald, tmp_path):
    handler = journal.make_handler(environ={}, stderr=io.StringIO(), path=journald.path)
    assert isinstance(handler, journal.JournalHandler)
    handler.close()
    plain = journal.make_handler(environ={}, stderr=io.StringIO(), path=str(tmp_path / "absent"))
    assert type(plain) is logging.StreamHandler


def test_make_handler_picks_the_journal_when_journal_stream_is_stderr(tmp_path):
    with open(tmp_path / "stderr", "w") as stderr:
        st = os.fstat(stderr.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        handler = journal.make_handler(environ=env, stderr=stderr, path=str(tmp_path / "absent"))
        assert isinstance(handler, journal.JournalHandler)
        handler.close()
        other = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}
        assert journal.stream_is_journal(env, stderr.fileno())
        assert not journal.stream_is_journal(other, stderr.fileno())
        assert not journal.stream_is_journal({"JOURNAL_STREAM": "junk"}, stderr.fileno())


def test_message_ids_are_distinct_128_bit_ids_for_every_event_kind():
    kinds = {"grant", "refusal", "run_end", "oom_kill", "healer", "storm", "oom_livelock", "warning"}
    assert set(journal.MESSAGE_IDS) == kinds
    ids = list(journal.MESSAGE_IDS.values())
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_oom_kill_fields_name_the_victim_its_cgroup_and_the_runs_alive():
    data = {"victim_pid": 321, "victim_comm": "php-fpm8.2", "victim_uid": 33,
            "task_memcg": "/oomguard-app.slice/php8.2-fpm.service", "oom_memcg": "/oomguard-app.slice",
            "protected_runs": [{"id": 4, "user": "shop", "uid": 1000, "command": "php x"}, {"id": 5}]}  # fmt: skip
    f = journal.event_fields("oom_kill", data)
    assert f["MESSAGE_ID"] == journal.MESSAGE_IDS["oom_kill"]
    assert (f["OOMGUARD_VICTIM_PID"], f["OOMGUARD_VICTIM_COMM"], f["OOMGUARD_VICTIM_UID"]) == (
        "321", "php-fpm8.2", "33",
    )  # fmt: skip
    assert f["OOMGUARD_CGROUP"] == "/oomguard-app.slice/php8.2-fpm.service"
    assert f["OOMGUARD_OOM_MEMCG"] == "/oomguard-app.slice"
    assert f["OOMGUARD_RUN_ID"] == ["4", "5"]


def test_healer_and_livelock_fields():
    healer = journal.event_fields(
        "healer",
        {"action": "restart", "run": 3, "dry_run": False, "pids": [10, 11],
         "services": [{"name": "nginx.service", "ok": True}, {"name": "php8.2-fpm.service", "ok": True}]},
    )  # fmt: skip
    assert healer["OOMGUARD_ACTION"] == "restart"
    assert healer["OOMGUARD_RUN_ID"] == "3"
    assert healer["OOMGUARD_DRY_RUN"] == "0"
    assert healer["OOMGUARD_PIDS"] == ["10", "11"]
    assert healer["OOMGUARD_SERVICE"] == ["nginx.service", "php8.2-fpm.service"]
    livelock = journal.event_fields("oom_livelock", {"oom_memcg": "/oomguard-app.slice"})
    assert livelock["OOMGUARD_CGROUP"] == "/oomguard-app.slice"
    assert livelock["MESSAGE_ID"] == journal.MESSAGE_IDS["oom_livelock"]
    refusal = journal.event_fields("refusal", {"uid": 1001, "reason": "not_allowed"})
    assert (refusal["OOMGUARD_UID"], refusal["OOMGUARD_REASON"]) == ("1001", "not_allowed")


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("victim_pid", "OOMGUARD_VICTIM_PID"),
        ("a-b.c", "OOMGUARD_A_B_C"),
        ("x" * 80, "OOMGUARD_" + "X" * 55),
    ],
)
def test_field_names_are_valid_journal_names(key, name):
    assert journal.field_name(key) == name
    assert journal.field_name("_9x", prefix="") == "X"
