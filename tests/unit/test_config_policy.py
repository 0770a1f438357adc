"""config.policy: classes, their globs, and the exe rule for privileged ones."""

import os

import pytest

from oomguard.config import ConfigError, parse_policy_class, trusted_paths


def cls(**kw):
    return parse_policy_class({"name": "c", **kw}, "policy.class[0]")


def privileged(exe, adj=-1000, **kw):
    return cls(oom_score_adj=adj, user=["nobody"], exe=exe, **kw)


@pytest.mark.parametrize("exe", [["*"], ["*/mariadbd"], ["?usr/sbin/x"]])
def test_a_privileged_exe_must_be_absolute(exe):
    with pytest.raises(ConfigError, match=r"^policy.class\[0\].exe\[0\]: .*must be an absolute path"):
        privileged(exe)


def test_a_privileged_glob_over_a_world_writable_directory_is_refused():
    with pytest.raises(ConfigError, match=r"^policy.class\[0\].exe\[0\]: '/tmp/\*' is privileged, but the "
                                          r"directory /tmp is writable by other users"):
        privileged(["/tmp/*"])


def test_healer_exempt_counts_as_privileged(tmp_path):
    with pytest.raises(ConfigError, match="is writable by other users"):
        privileged([f"{tmp_path}/bin/*"], adj=0, healer_exempt=True)


def test_a_privileged_glob_that_spans_the_tree_is_refused():
    with pytest.raises(ConfigError, match=r"exe\[0\]: '/\*' is privileged"):
        privileged(["/*"])


def test_a_directory_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(trusted_paths, "_ancestors", lambda d: [d])  # leave /tmp out
    (tmp_path / "bin").mkdir(mode=0o755)
    os.chown(tmp_path / "bin", 65534, 65534)
    with pytest.raises(ConfigError, match=f"directory {tmp_path}/bin is owned by uid 65534, not root"):
        privileged([f"{tmp_path}/bin/*"])


def test_a_writable_directory_below_the_glob_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(trusted_paths, "_ancestors", lambda d: [d])
    os.chmod(tmp_path, 0o755)
    (tmp_path / "sub" / "drop").mkdir(parents=True)
    os.chmod(tmp_path / "sub" / "drop", 0o777)
    with pytest.raises(ConfigError, match=f"directory {tmp_path}/sub/drop is writable by other users"):
        privileged([f"{tmp_path}/*"])
    os.chmod(tmp_path / "sub" / "drop", 0o755)
    assert privileged([f"{tmp_path}/*"]).exe == (f"{tmp_path}/*",)


def test_a_glob_over_root_only_directories_and_exact_paths_are_accepted():
    assert os.stat("/usr/sbin").st_uid == 0
    c = privileged(["/usr/sbin/php-fpm*", "/opt/shop/bin/mariadbd"])
    assert c.privileged and c.exe == ("/usr/sbin/php-fpm*", "/opt/shop/bin/mariadbd")


def test_a_glob_through_a_symlink_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(trusted_paths, "_ancestors", lambda d: [d])
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ConfigError, match=f"directory {tmp_path}/link is a symlink; name the directory"):
        privileged([f"{tmp_path}/link/*"])


def test_a_glob_under_a_directory_not_made_yet_is_judged_by_its_ancestors(tmp_path):
    assert privileged(["/usr/sbin/not-installed-yet/*"]).exe == ("/usr/sbin/not-installed-yet/*",)
    with pytest.raises(ConfigError, match="directory /tmp is writable by other users"):
        privileged(["/tmp/not-made-yet/bin/*"])


def test_an_unprivileged_class_may_name_any_absolute_path():
    assert cls(oom_score_adj=500, exe=["/tmp/*"]).exe == ("/tmp/*",)


@pytest.mark.parametrize(
    "matcher, message",
    [
        ({"comm": ["[unclosed"]}, r"comm\[0\]: glob '\[unclosed' has a '\['"),
        ({"exe": ["/usr/bin/[unclosed"]}, r"exe\[0\]: glob .* has a '\['"),
        ({"comm": ["a-comm-longer-than-15"]}, r"comm\[0\]: .* can never match: the kernel keeps 15"),
        ({"exe": ["mariadbd"]}, r"exe\[0\]: 'mariadbd' can never match: exe paths are absolute"),
        ({"cgroup": ["system.slice/x"]}, r"cgroup\[0\]: .* can never match: cgroup paths are absolute"),
        ({"unit": ["a/b.service"]}, r"unit\[0\]: .* can never match: a unit name has no '/'"),
        ({"comm": ["[z-a]"]}, r"comm\[0\]: glob .* empty range"),
    ],
)
def test_globs_that_cannot_compile_or_match_are_refused(matcher, message):
    with pytest.raises(ConfigError, match=r"^policy.class\[0\]\." + message):
        cls(oom_score_adj=100, **matcher)


def test_class_defaults_come_from_the_dataclass():
    c = cls(oom_score_adj=100, comm=["x"])
    assert c.essential is True and c.healer_exempt is False and c.exe == ()


def test_a_cmdline_matcher_only_makes_a_process_a_likelier_victim():
    c = cls(oom_score_adj=500, user=["nobody"], cmdline=["php bin/magento queue:consumers*"])
    assert c.cmdline == ("php bin/magento queue:consumers*",)
    for bad in ({"oom_score_adj": -100}, {"oom_score_adj": 0}, {"oom_score_adj": 500, "healer_exempt": True}):
        kw = {"user": ["nobody"], "exe": ["/usr/bin/php8.2"], "cmdline": ["*cron:run*"], **bad}
        with pytest.raises(ConfigError, match=r"^policy.class\[0\].cmdline: .*raises oom_score_adj above 0"):
            cls(**kw)
    with pytest.raises(ConfigError, match=r"^policy.class\[0\].cmdline\[0\]: "):
        cls(oom_score_adj=500, cmdline=["[unclosed"])
