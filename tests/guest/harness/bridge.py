"""pytest across the guest boundary, for a conftest that owns one test directory.

On the host, ``GuestSuite.replace_items`` swaps every selected test under the
directory for a ``GuestItem``; the first one to run boots ONE guest (of the
suite's flavour) that runs ``pytest <those node ids>`` as root, and each item
then reports its test's outcome there.  Only "passed" passes: failures,
errors, skips, xfails and tests the guest never finished all fail, and a guest
that cannot boot fails every item with the console tail.  In the guest,
``record_report`` writes each test phase for the host to read.

This is the mechanism of tests/guest/conftest.py, parameterised by directory,
flavour and environment prefix, so that tests/systemd/ can use it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from .vm import GuestError, GuestResult, run_guest

REPORT_ENV = "OOMGUARD_GUEST_REPORT"  # in the guest: where to write per-test outcomes
HOST_IGNORED_MARKS = {"skip", "skipif", "xfail"}


class GuestTestFailed(Exception):
    """A guest test did not pass in the guest; the message says why."""


@dataclass
class Outcome:
    status: str  # passed | failed | skipped | missing
    text: str


class GuestItem(pytest.Item):
    """Stand-in for a guest test on the host: reports the test's guest outcome."""

    def __init__(self, *, original: pytest.Item, suite: GuestSuite, **kwargs):
        super().__init__(**kwargs)
        self._location = original.reportinfo()
        self.suite = suite
        # skip/xfail marks are evaluated in the guest, where skipping fails
        self.own_markers = [m for m in original.own_markers if m.name not in HOST_IGNORED_MARKS]
        self.keywords.update(original.keywords)

    def runtest(self) -> None:
        status, text = self.suite.run(self.session).outcome(self.nodeid)
        if status != "passed":
            raise GuestTestFailed(text)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, GuestTestFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self._location


@dataclass
class GuestSuite:
    """The tests under ``directory``, run in one guest of ``flavour``.

    Host knobs: ``{env_prefix}_RESULTS`` (host dir for junit.xml, console.log,
    outcomes.jsonl, ...; default a new temp dir), ``_TIMEOUT`` (seconds),
    ``_MEM`` (MiB), ``_CPUS``.

    ``writable``: extra tmpfs overlays in the guest (run_guest's ``writable``).
    ``prepare(results_dir, nodeids)``: runs on the host before the boot and
    returns extra environment for the guest's pytest (say, where it put
    files it built for the tests; results_dir is /results in the guest).
    """

    directory: Path
    flavour: str
    env_prefix: str
    timeout: float = 900
    memory_mib: int = 1024
    writable: tuple[str, ...] = ()
    prepare: Callable[[Path, list[str]], dict[str, str]] | None = None
    _run: GuestRun | None = None

    def owns(self, item: pytest.Item) -> bool:
        return Path(item.path).resolve().is_relative_to(self.directory)

    def replace_items(self, items: list[pytest.Item]) -> None:
        for i, item in enumerate(items):
            if self.owns(item) and not isinstance(item, GuestItem):
                items[i] = GuestItem.from_parent(
                    item.parent, name=item.name, original=item, suite=self
                )
                assert items[i].nodeid == item.nodeid, (items[i].nodeid, item.nodeid)

    def run(self, session: pytest.Session) -> GuestRun:
        if self._run is None:
            self._run = GuestRun(session, self)
        return self._run

    def summary(self) -> str | None:
        return self._run.summary() if self._run else None

    def knob(self, name: str, default: float) -> float:
        return float(os.environ.get(f"{self.env_prefix}_{name}", default))


class GuestRun:
    """The single guest boot that runs all of a suite's selected tests."""

    def __init__(self, session: pytest.Session, suite: GuestSuite):
        config = session.config
        self.suite = suite
        self.nodeids = [
            i.nodeid for i in session.items if isinstance(i, GuestItem) and i.suite is suite
        ]
        self.results_dir = Path(
            os.environ.get(f"{suite.env_prefix}_RESULTS")
            or tempfile.mkdtemp(prefix=f"oomguard-{suite.flavour}-guest-pytest-")
        ).resolve()
        self.results_dir.mkdir(parents=True, exist_ok=True)
        report = self.results_dir / "outcomes.jsonl"
        for stale in (report, self.results_dir / "junit.xml"):
            stale.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "pytest", *self.nodeids, "-p", "no:cacheprovider", "-v"]
        argv += ["--junitxml=/results/junit.xml", f"--rootdir={config.rootpath}"]
        if config.inipath:
            argv.append(f"--config-file={config.inipath}")
        if config.option.maxfail:
            argv.append(f"--maxfail={config.option.maxfail}")

        self.error: str | None = None
        self.result: GuestResult | None = None
        capman = config.pluginmanager.getplugin("capturemanager")
        started = time.monotonic()
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            prefix = f"{suite.flavour}-guest| "
            stream = Prefixed(sys.stdout, prefix) if config.get_verbosity() >= 0 else None
            if stream:
                stream.out.write(
                    f"\n--- booting the {suite.flavour} guest for {len(self.nodeids)} test(s) ---\n"
                )
            try:
                extra = suite.prepare(self.results_dir, self.nodeids) if suite.prepare else {}
                self.result = run_guest(
                    argv,
                    timeout=suite.knob("TIMEOUT", suite.timeout),
                    memory_mib=int(suite.knob("MEM", suite.memory_mib)),
                    cpus=int(suite.knob("CPUS", 2)),
                    env=self.env() | extra,
                    results_dir=self.results_dir,
                    stream=stream,
                    cwd=config.rootpath,
                    writable=suite.writable,
                    flavour=suite.flavour,
                )
            except GuestError as exc:
                self.error = f"the {suite.flavour} guest failed, so none of its tests ran: {exc}"
            except Exception as exc:  # a harness bug: report it once per item, don't retry
                self.error = f"the guest harness crashed: {exc!r}"
            if stream:
                stream.out.write(f"\n--- {suite.flavour} guest finished ---\n")
        self.seconds = time.monotonic() - started
        self.outcomes = read_outcomes(report)

    @staticmethod
    def env() -> dict[str, str]:
        env = {REPORT_ENV: "/results/outcomes.jsonl"}
        # entry-point plugins cost seconds of startup under TCG
        if os.environ.get("OOMGUARD_GUEST_PLUGIN_AUTOLOAD") != "1":
            env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        return env

    def outcome(self, nodeid: str) -> tuple[str, str]:
        if self.error:
            return "failed", self.error
        out = self.outcomes.get(nodeid)
        if out is None or out.status == "missing":
            tail = "\n".join(self.result.console.splitlines()[-40:])
            why = out.text if out else "it was not reported by the guest run"
            return "missing", (
                f"did not finish in the guest: {why} (guest pytest exit status "
                f"{self.result.returncode}); console: {self.results_dir / 'console.log'}\n{tail}"
            )
        if out.status == "skipped":
            return "failed", f"skipped in the guest, which counts as a failure: {out.text}"
        return out.status, out.text

    def summary(self) -> str:
        if self.result is None:
            return f"{self.suite.flavour} guest failed after {self.seconds:.1f} s; results: {self.results_dir}"
        r = self.result
        return (
            f"{len(self.nodeids)} {self.suite.flavour} guest test(s); first test command started "
            f"{r.boot_seconds:.1f} s after launching QEMU, guest ran {r.total_seconds:.1f} s; "
            f"console.log, junit.xml (and journal.txt) in {self.results_dir}"
        )


def read_outcomes(report: Path) -> dict[str, Outcome]:
    """Fold the guest's setup/call/teardown reports into one outcome per node id.

    "passed" needs a passing call AND a teardown report: a test whose run was
    cut short (the guest pytest crashed) is "missing", not passed.
    """
    phases: dict[str, list[dict]] = {}
    if report.exists():
        for line in report.read_text().splitlines():
            rep = json.loads(line)
            phases.setdefault(rep["nodeid"], []).append(rep)
    outcomes = {}
    for nodeid, reps in phases.items():
        problems = []
        for rep in reps:
            if rep.get("wasxfail") is not None:
                status, prefix = "skipped", f"xfailed/xpassed ({rep['wasxfail']}): "
            elif rep["outcome"] == "failed":
                status = "failed"
                prefix = "" if rep["when"] == "call" else f"error in {rep['when']}: "
            elif rep["outcome"] == "skipped":
                status, prefix = "skipped", ""
            else:
                continue
            text = prefix + rep["longrepr"]
            for title, content in rep.get("sections", []):
                text += f"\n{'-' * 10} {title} {'-' * 10}\n{content}"
            problems.append((status, text))
        whens = {rep["when"] for rep in reps}
        if any(status == "failed" for status, _ in problems):
            status = "failed"
        elif problems:
            status = "skipped"
        elif {"call", "teardown"} <= whens:
            status = "passed"
        else:
            last = max(whens, key=["setup", "call", "teardown"].index)
            status = "missing"
            problems = [("missing", f"the guest run stopped after its {last} phase")]
        outcomes[nodeid] = Outcome(status, "\n".join(text for _, text in problems))
    return outcomes


def record_report(report: pytest.TestReport, path: str) -> None:
    """In the guest: append one test phase's outcome for the host (JSON line)."""
    text = report.longreprtext
    if report.skipped and isinstance(report.longrepr, tuple):  # (path, lineno, reason)
        where, lineno, reason = report.longrepr
        text = f"{where}:{lineno}: {reason}"
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:  # the one-line summary first, as pytest's -ra line shows it
        text = f"{crash.message.splitlines()[0] if crash.message else ''}\n\n{text}"
    record = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "longrepr": text,
        "wasxfail": getattr(report, "wasxfail", None),
        "sections": report.sections if report.outcome != "passed" else [],
    }
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


class Prefixed:
    """Writes to ``out`` with ``prefix`` at the start of every line."""

    def __init__(self, out, prefix: str):
        self.out, self.prefix, self.bol = out, prefix, True

    def write(self, text: str) -> None:
        if not text:
            return
        body = ("\n" + self.prefix).join(text.split("\n"))
        self.out.write(
            (self.prefix if self.bol else "")
            + (body[: -len(self.prefix)] if text.endswith("\n") else body)
        )
        self.bol = text.endswith("\n")

    def flush(self) -> None:
        self.out.flush()
