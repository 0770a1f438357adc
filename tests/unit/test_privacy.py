"""A non-root user's view of stored events: their own part only."""

from __future__ import annotations

from oomguard.forensics.privacy import event_for

SHOP, OTHER = 1001, 1002


def oom_kill(victim_uid: int) -> dict:
    return {
        "id": 7, "ts": 1.0, "kind": "oom_kill", "uids": sorted({victim_uid, SHOP, OTHER}),
        "data": {
            "victim_pid": 4242, "victim_comm": "import", "victim_uid": victim_uid,
            "task_memcg": "/oomguard.app/x", "oom_memcg": "/oomguard.app",
            "invoker_comm": "secret-tool", "invoker_pid": 9, "anon_rss_kb": 1000,
            "protected_runs": [
                {"id": 1, "user": "shop", "uid": SHOP, "command": "php import.php"},
                {"id": 2, "user": "other", "uid": OTHER, "command": "mysqldump --password=hunter2"},
            ],
        },
    }  # fmt: skip


def test_root_sees_the_event_unchanged() -> None:
    e = oom_kill(SHOP)
    assert event_for(e, None) is e and event_for(e, 0) is e


def test_the_victims_owner_sees_the_victim_but_not_other_users_runs() -> None:
    seen = event_for(oom_kill(SHOP), SHOP)
    d = seen["data"]
    assert (d["victim_pid"], d["victim_comm"], d["task_memcg"]) == (4242, "import", "/oomguard.app/x")
    assert [r["id"] for r in d["protected_runs"]] == [1]
    assert d["other_users_hidden"] == 1
    assert "hunter2" not in repr(seen) and "secret-tool" not in repr(seen)
    assert seen["uids"] == [SHOP]


def test_a_user_whose_run_was_alive_learns_of_the_kill_but_not_whose_process_it_was() -> None:
    seen = event_for(oom_kill(SHOP), OTHER)
    d = seen["data"]
    for f in ("victim_pid", "victim_comm", "victim_uid", "task_memcg", "oom_memcg", "invoker_comm"):
        assert f not in d
    assert d["victim"] == "another user's process" and d["anon_rss_kb"] == 1000
    assert [r["command"] for r in d["protected_runs"]] == ["mysqldump --password=hunter2"]  # their own
    assert "import" not in repr(seen) and "php" not in repr(seen)


def test_any_list_of_other_users_records_is_filtered() -> None:
    healer = {"id": 3, "ts": 2.0, "kind": "healer", "uids": [SHOP, OTHER],
              "data": {"action": "kill_runs", "runs": [{"id": 1, "uid": SHOP, "command": "a"},
                                                      {"id": 2, "uid": OTHER, "command": "b"}]}}  # fmt: skip
    assert event_for(healer, OTHER)["data"]["runs"] == [{"id": 2, "uid": OTHER, "command": "b"}]
    assert healer["data"]["runs"][0]["command"] == "a"  # the stored event is not changed
