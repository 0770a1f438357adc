"""host.users: the user and group databases, answered with None for unknowns."""

from oomguard.host import users


def test_names_and_ids_both_ways():
    assert users.uid_of("root") == 0 and users.gid_of("root") == 0
    assert users.name_of(0) == "root" and users.exists("root")
    assert users.uid_of("nobody") == 65534


def test_unknown_names_and_ids_are_none():
    assert users.uid_of("no-such-user-xyz") is None and not users.exists("no-such-user-xyz")
    assert users.gid_of("no-such-group-xyz") is None
    assert users.name_of(4_000_000_000) is None
    assert users.name_of(1 << 40) is None  # beyond uid_t: no entry, not an OverflowError


def test_user_names_for_tables_show_unknown_uids_as_numbers():
    names = users.UserNames()
    assert names(0) == "root" and names(4_000_000_000) == "4000000000"


def test_login_range_defaults(tmp_path):
    (tmp_path / "login.defs").write_text("UID_MIN 500\nUID_MAX\tnot-a-number\n")
    assert users.login_uid_range(tmp_path / "login.defs") == (500, 60000)
    assert users.login_uid_range(tmp_path / "absent") == users.DEFAULT_LOGIN_RANGE
