"""host/journal.py against the real systemd-journald: found again by MESSAGE_ID."""

from __future__ import annotations

import json
import sys
import uuid

from systemd_tools import run, wait_until

from oomguard.host import journal

# Logs one oom_kill event the way the daemon would, with a hostile comm.
LOGGER = """
import logging, sys
from oomguard.host import journal
handler = journal.make_handler(identifier="oomguard-journal-test")
log = logging.getLogger("oomguard.test")
log.addHandler(handler)
log.setLevel(logging.INFO)
data = {"victim_pid": 4321, "victim_comm": sys.argv[2], "victim_uid": 1000,
        "task_memcg": "/oomguard-app.slice/php8.2-fpm.service", "protected_runs": [{"id": 7}],
        "marker": sys.argv[1], "command": sys.argv[3] * int(sys.argv[4])}
log.warning("kernel OOM kill: %s", sys.argv[2],
            extra={journal.EXTRA_ATTR: journal.event_fields("oom_kill", data)})
print(type(handler).__name__)
"""
HOSTILE_COMM = "php\nMESSAGE_ID=00000000000000000000000000000000"


def entries(marker: str) -> list[dict]:
    out = run(
        ["journalctl", "--no-pager", "--all", "-o", "json",
         f"MESSAGE_ID={journal.MESSAGE_IDS['oom_kill']}", f"OOMGUARD_MARKER={marker}"],
        check=False,
    ).stdout  # fmt: skip
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def field(entry: dict, name: str) -> str:
    """journalctl -o json gives binary-safe fields (with a newline) as lists of bytes."""
    value = entry[name]
    return bytes(value).decode() if isinstance(value, list) else value


def log_one(
    argv_prefix: list[str], command: str = "php import.php", repeat: int = 1
) -> tuple[str, str]:
    """Run LOGGER (after ``argv_prefix``); returns its marker and its output."""
    marker = uuid.uuid4().hex
    argv = [*argv_prefix, sys.executable, "-c", LOGGER, marker, HOSTILE_COMM, command, str(repeat)]
    out = run(argv)
    return marker, out.stdout


def test_an_event_is_found_by_its_message_id_with_its_fields_intact():
    marker, used = log_one([])
    assert used.strip() == "JournalHandler"  # the socket is there
    (entry,) = wait_until(lambda: entries(marker), "the entry in the journal")
    assert field(entry, "MESSAGE") == f"kernel OOM kill: {HOSTILE_COMM}"
    assert field(entry, "PRIORITY") == "4"
    assert field(entry, "SYSLOG_IDENTIFIER") == "oomguard-journal-test"
    assert field(entry, "OOMGUARD_VICTIM_PID") == "4321"
    assert field(entry, "OOMGUARD_VICTIM_COMM") == HOSTILE_COMM
    assert field(entry, "OOMGUARD_VICTIM_UID") == "1000"
    assert field(entry, "OOMGUARD_CGROUP") == "/oomguard-app.slice/php8.2-fpm.service"
    assert field(entry, "OOMGUARD_RUN_ID") == "7"
    assert field(entry, "MESSAGE_ID") == journal.MESSAGE_IDS["oom_kill"]


def test_a_big_entry_arrives_through_a_memfd():
    # 1 MiB: more than one datagram to journald's socket may carry
    marker, _ = log_one([], "x", 1 << 20)
    (entry,) = wait_until(lambda: entries(marker), "the big entry in the journal")
    assert field(entry, "OOMGUARD_COMMAND") == "x" * (1 << 20)


def test_a_service_with_its_stderr_on_the_journal_logs_natively():
    # stdout and stderr of a service go to the journal: $JOURNAL_STREAM is set
    marker, _ = log_one(["systemd-run", "--quiet", "--wait", "--unit", "oomguard-journal-test"])
    (entry,) = wait_until(lambda: entries(marker), "the service's entry in the journal")
    assert field(entry, "_SYSTEMD_UNIT") == "oomguard-journal-test.service"
    assert field(entry, "OOMGUARD_VICTIM_COMM") == HOSTILE_COMM
