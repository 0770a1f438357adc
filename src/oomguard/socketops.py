"""The daemon's answers to the socket's queries: runs, a run's report,
kill-run, events, status and settings.

Each op runs in the broker's pool (never on its loop) with the peer's
kernel-given identity; every field is checked by broker.protocol, and a
non-root user gets only what is theirs (forensics.privacy). The state read
here belongs to the daemon's parts; this module owns none of it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from oomguard.broker import Handler, Peer, Refusal, protocol
from oomguard.broker.cache import Brief
from oomguard.forensics import eventpage, events, privacy, runreport, status
from oomguard.prefs.settings import SettingError
from oomguard.runs.views import run_view
from oomguard.telemetry.reasons import RefusalReason


class SocketOps:
    def __init__(self, daemon: Any):  # the Daemon (a layer above: not imported)
        self.d = daemon
        self.status_view = Brief(self._status_snapshot, ttl=1.0)  # many askers, one computation

    def handlers(self) -> dict[str, Handler]:
        return {
            "runs": self.op_runs,
            "kill-run": self.op_kill_run,
            "events": self.op_events,
            "status": self.op_status,
            "settings": self.op_settings,
        }

    def op_runs(self, peer: Peer, request: dict) -> dict:
        rid = protocol.integer(request, "id", 0, protocol.MAX_ID, None, "runs: id must be an integer")
        if rid is not None:
            return {"report": self.run_report(rid, peer.uid)}
        runs = self.d.registry.all() if protocol.flag(request, "all") else self.d.registry.active()
        if peer.uid != 0:
            runs = [r for r in runs if r.uid == peer.uid]
        return {"runs": [run_view(r) for r in runs]}

    def _own_run(self, rid: int, uid: int):
        """Run ``rid`` if user ``uid`` (0: root) may act on it; another
        user's run is refused as if it did not exist."""
        run = self.d.registry.get(rid)
        if run is None or (uid != 0 and run.uid != uid):
            raise Refusal(f"no run {rid}" + ("" if uid == 0 else " of yours"))
        return run

    def run_report(self, rid: int, uid: int) -> dict:
        """Run ``rid``'s report as user ``uid`` (0: root) may see it."""
        run = self._own_run(rid, uid)
        asker = None if uid == 0 else uid
        window = {"since": run.started - 1, "until": (run.ended or time.time()) + 1, "uid": asker}
        kills = self.d.store.query(kinds=["oom_kill"], limit=runreport.MAX_KILLS, **window)
        stops = self.d.store.query(kinds=["healer"], limit=runreport.MAX_KILLS, **window)
        return runreport.build(run_view(run), privacy.events_for(kills, asker), stops, time.time())

    def op_settings(self, peer: Peer, request: dict) -> dict:
        """The caller's own settings; with ``name`` and ``value``, change one."""
        name, value = request.get("name"), request.get("value")
        if name is None:
            return {"settings": self.d.settings.of(peer.uid)}
        if not isinstance(name, str) or len(name) > 64:
            raise Refusal("settings: name must be a setting's name", RefusalReason.INVALID)
        if not isinstance(value, str | bool) or isinstance(value, str) and len(value) > 16:
            raise Refusal("settings: value must be on or off", RefusalReason.INVALID)
        try:
            old, new = self.d.settings.change(peer.uid, name, value)
        except SettingError as e:
            raise Refusal(str(e)) from None
        self.d.emit("setting", {"uid": peer.uid, "user": peer.user, "name": name, "old": old, "new": new},
                  [peer.uid])  # fmt: skip
        return {"settings": self.d.settings.of(peer.uid), "changed": old != new}

    def op_kill_run(self, peer: Peer, request: dict) -> dict:
        """Root ends any run; a user ends their own (as the healer's warning
        tells them to). Another user's run is refused as if it did not exist."""
        rid = protocol.integer(request, "id", 0, protocol.MAX_ID, None, "kill-run needs an integer id")
        if rid is None:
            raise Refusal("kill-run needs an integer id")
        run = self._own_run(rid, peer.uid)
        if not run.active:
            raise Refusal(f"run {rid} already ended ({run.end_reason})")
        who = "an administrator" if peer.uid == 0 else "its owner"
        result = self.d.healer.kill_run(run, why=f"stopped by {who} (oomguard kill-run)")
        what = f"run {rid} ({run.user}: {run.command[:60]})"
        if result.get("action") == "killed":
            return {"result": result, "message": f"{what} stopped"}
        # spared_some / kill_failed: say so, and fail the command
        raise Refusal(f"{what} not fully stopped: {result.get('action')}; see oomguard events --kind healer")

    def op_events(self, peer: Peer, request: dict) -> dict | bytes:
        """One page of events, newest first across pages: at most ``page``
        (and ``limit``) events before the ``before`` cursor, oldest first,
        and ``next`` to ask for the older ones."""
        since = protocol.number(request, "since", -protocol.MAX_TIMESTAMP, protocol.MAX_TIMESTAMP,
                                "since must be a number (epoch seconds)")  # fmt: skip
        kinds = protocol.strings(request, "kinds", 64, 64, "kinds must be a list of strings")
        limit = protocol.integer(request, "limit", 1, 100_000, 1000, "limit must be an integer from 1 to 100000")
        size = protocol.integer(request, "page", 1, events.MAX_PAGE, events.PAGE, "page must be an integer from 1 to 500")
        before = protocol.cursor(request, "before")
        q = eventpage.PageQuery(since=since, kinds=None if kinds is None else tuple(kinds), limit=limit, size=size,
                                before=before, uid=None if peer.uid == 0 else peer.uid, budget=protocol.MAX_REPLY)  # fmt: skip
        line = self.d.event_reader.ask(q)  # big pages cost the broker's GIL nothing there
        return line if line is not None else eventpage.events_page(self.d.store, q)

    def op_status(self, peer: Peer, request: dict) -> dict:
        root = peer.uid == 0
        view = self.status_view.get()
        out = dict(view["system"])
        out["protected"] = [p for p in view["protected"] if root or p["uid"] == peer.uid]
        out["runs"] = [run_view(r) for r in self.d.registry.active() if root or r.uid == peer.uid]
        out["healer"] = view["healer"]
        if not root:  # other users' runs and commands are not theirs to see
            out["healer"] = {k: v for k, v in out["healer"].items() if k not in ("last_actions", "killed_runs")}
        kills = self.d.store.query(kinds=["oom_kill"], uid=None if root else peer.uid, limit=5)
        out["last_oom_kills"] = privacy.events_for(kills, None if root else peer.uid)
        out["daemon"] = {"pid": os.getpid(), "process_events": self.d.events_mode, "config": self.d.cfg.source}
        return out

    def _status_snapshot(self) -> dict:
        """The costly part of status (the healer's lock, the protected
        processes), as root sees it."""
        return {"system": status.collect(self.d.cfg), "protected": self._protected(),
                "healer": self.d.healer.status()}  # fmt: skip

    def _protected(self) -> list[dict]:
        """The processes at -1000 now. The enforcer, on process events, knows
        every process's value as last seen or written; those it saw at -1000
        and the active runs' processes are checked now, with no walk of /proc.
        Without events, or before its first walk, it knows too little: walk."""
        enforcer = self.d.enforcer
        known = None
        if self.d.cfg.policy.enforce and self.d.events_mode == "events":
            with enforcer.lock:
                if enforcer.adj.complete:
                    known = enforcer.adj.protected()
        if known is None:
            return status.protected_processes(None)
        candidates: list[tuple[int, int | None]] = list(known)
        for run in self.d.registry.active():
            inside, outside = self.d.registry.processes(run)
            candidates += [(pid, None) for pid in inside]
            candidates += outside
        return status.protected_among(candidates)
