"""The Debian package, as dpkg, lintian and an operator see it.

Built once per session with ``scripts/build-deb`` (which installs the build
dependencies with apt when any is missing, so the first run needs root),
then read with ``dpkg-deb`` and unpacked with ``dpkg-deb -x``: nothing is
installed on the host. The example config's own test needs no build.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

import oomguard
from oomguard import config
from oomguard.cli import setup

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "contrib" / "config" / "oomguard.toml"
OVERRIDES = REPO / "debian" / "oomguard.lintian-overrides"
SYSTEM_PYTHON = "/usr/bin/python3"
# Debian's tools and interpreter, never a venv's or pyenv's python3.
SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
DIST = "usr/lib/python3/dist-packages"
VENDOR_HEADER = "# Shipped by the oomguard package."


def run(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    kw.setdefault("env", SYSTEM_ENV)
    return subprocess.run(argv, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    r = run([str(REPO / "scripts" / "build-deb"), "--out", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.parent == out and path.is_file()
    return path


@pytest.fixture(scope="module")
def unpacked(deb, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


@pytest.fixture(scope="module")
def control(deb, tmp_path_factory) -> Path:
    """The control archive: control, conffiles and the maintainer scripts."""
    where = tmp_path_factory.mktemp("control")
    subprocess.run(["dpkg-deb", "-e", str(deb), str(where)], check=True)
    return where


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True,
                          text=True, check=True).stdout.strip()


def contents(deb: Path) -> dict[str, str]:
    """path (without the leading ./) -> the listing's mode column."""
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True,
                             text=True, check=True).stdout
    out = {}
    for line in listing.splitlines():
        mode, *_rest = line.split(None, 5)
        name = line.split(None, 5)[5].split(" -> ")[0]
        out[name.removeprefix("./").rstrip("/")] = mode
    return out


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ---------------------------------------------------------------- what it ships


def test_ships_the_commands_the_unit_the_config_the_manual_and_completion(deb):
    files = contents(deb)
    for name in pyproject()["project"]["scripts"]:
        assert files.get(f"usr/bin/{name}", "").startswith("-rwxr-xr-x"), name
    for path in (
        "lib/systemd/system/oomguard.service",
        "etc/oomguard/oomguard.toml",
        "usr/share/man/man1/oom-protect.1.gz",
        "usr/share/man/man1/hypernode-oom-protect.1.gz",
        "usr/share/man/man8/oomguard.8.gz",
        "usr/share/man/man5/oomguard.toml.5.gz",
        "usr/share/bash-completion/completions/oomguard",
        "usr/share/bash-completion/completions/oom-protect",
        "usr/share/bash-completion/completions/hypernode-oom-protect",
        f"{DIST}/oomguard/protect.py",
        "usr/share/doc/oomguard/copyright",
        "usr/share/doc/oomguard/runbook.md",  # every alert's runbook_url, uncompressed
    ):
        assert path in files, path
    # Debian's prometheus-client is used, not a copy; no venv, no pip.
    assert not [f for f in files if "prometheus_client" in f or "/bin/pip" in f or "site-packages" in f]


def test_the_example_config_and_the_login_notice_are_conffiles(control):
    assert sorted((control / "conffiles").read_text().split()) == [
        "/etc/oomguard/oomguard.toml", "/etc/profile.d/oomguard-motd.sh"]  # fmt: skip


def test_depends_on_debian_python3_and_prometheus_client_only(deb):
    assert field(deb, "Package") == "oomguard"
    assert field(deb, "Architecture") == "all"
    depends = [d.strip() for d in field(deb, "Depends").split(",")]
    names = {re.split(r"[ (:]", d)[0] for d in depends}
    assert names == {"python3", "python3-prometheus-client"}, depends
    assert "python3-prometheus-client (>= 0.16)" in depends


def test_the_versions_agree(deb):
    version = pyproject()["project"]["version"]
    assert field(deb, "Version") == version == oomguard.__version__


# ---------------------------------------------------------------- the vendor unit


def test_the_vendor_unit_is_the_one_setup_writes(unpacked):
    shipped = (unpacked / "lib/systemd/system/oomguard.service").read_text()
    rendered = setup.render_units(config.Config(), 1 << 40, None, exec_start="/usr/bin/oomguard",
                                  classes=())[f"{setup.UNIT_DIR}/oomguard.service"]
    assert shipped.startswith(VENDOR_HEADER)
    body = shipped[shipped.index("[Unit]"):]
    assert body == rendered.removeprefix(setup.HEADER)
    assert "ExecStart=/usr/bin/oomguard daemon\n" in body


def test_maintainer_scripts_start_and_stop_only_through_deb_systemd_invoke(control):
    scripts = {n: (control / n).read_text() for n in ("postinst", "prerm", "postrm")}
    assert "deb-systemd-invoke $_dh_action 'oomguard.service'" in scripts["postinst"]
    assert "deb-systemd-invoke stop 'oomguard.service'" in scripts["prerm"]
    for name, text in scripts.items():
        # deb-systemd-invoke and invoke-rc.d ask policy-rc.d; systemctl would not.
        for line in text.splitlines():
            if "systemctl" in line and "deb-systemd-" not in line:
                assert re.search(r"systemctl --system daemon-reload", line), (name, line)
        assert "/etc/init.d/" not in text and "service oomguard" not in text, name
    assert 'rm -rf /var/lib/oomguard' in scripts["postrm"]
    purge = scripts["postrm"].split('if [ "$1" = "purge" ]; then', 1)[1].split("fi", 1)[0]
    assert "/var/lib/oomguard" in purge


# ---------------------------------------------------------------- the commands, unpacked


def test_the_shipped_config_passes_config_check(unpacked):
    env = dict(SYSTEM_ENV, PYTHONPATH=str(unpacked / DIST))
    conf = unpacked / "etc/oomguard/oomguard.toml"
    r = run([SYSTEM_PYTHON, str(unpacked / "usr/bin/oomguard"), "config", "check", str(conf)], env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{conf}: OK"


def test_the_packaged_oom_protect_starts_isolated_and_imports_no_re(unpacked):
    for name in ("oom-protect", "hypernode-oom-protect"):
        wrapper = unpacked / "usr/bin" / name
        assert wrapper.read_text().splitlines()[0] == "#!/usr/bin/python3 -I"
    # -I ignores PYTHONPATH: put the unpacked tree on sys.path by hand, then
    # run the wrapper's own code as the script.
    wrapper = unpacked / "usr/bin/oom-protect"
    boot = (f"import sys; sys.path.insert(0, {str(unpacked / DIST)!r}); sys.argv[0] = {str(wrapper)!r}; "
            "exec(compile(open(sys.argv[0]).read(), sys.argv[0], 'exec'))")
    r = run([SYSTEM_PYTHON, "-I", "-X", "importtime", "-c", boot, "--version"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"oom-protect (oomguard) {oomguard.__version__}"
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert "oomguard.protect" in imported
    assert not imported & {"re", "enum", "argparse", "oomguard.config", "prometheus_client"}, imported


def test_man_pages_render_without_warnings(unpacked):
    pages = sorted((unpacked / "usr/share/man").glob("man*/*.gz"))
    assert len(pages) == 4
    for page in pages:
        r = run(["man", "--warnings", "-E", "UTF-8", "-l", str(page)], env=dict(SYSTEM_ENV, MANWIDTH="80"))
        assert r.returncode == 0 and r.stderr == "", (page.name, r.stderr)
        assert "SEE ALSO" in r.stdout, page.name


def complete(unpacked: Path, words: list[str]) -> list[str]:
    """What bash completion offers for the last of ``words`` (bash-completion
    proper plus the unpacked completion files, as a login shell loads them)."""
    completions = unpacked / "usr/share/bash-completion/completions"
    line = " ".join(words)
    script = (
        "source /usr/share/bash-completion/bash_completion\n"
        f"source {completions / 'oomguard'}\nsource {completions / 'oom-protect'}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        f"COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}\n"
        f"func=$(complete -p {words[0]} | sed -E 's/.*-F ([^ ]+).*/\\1/')\n"
        f"$func {words[0]} {words[-1]!r} {words[-2]!r}\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    r = run(["bash", "--norc", "--noprofile", "-c", script])
    assert r.returncode == 0, r.stderr
    return sorted(w for w in r.stdout.splitlines() if w)


def test_bash_completion_offers_commands_actions_and_options(unpacked):
    assert complete(unpacked, ["oomguard", "po"]) == ["policy"]
    assert complete(unpacked, ["oomguard", "--config", "x.toml", "policy", "s"]) == ["show"]
    assert complete(unpacked, ["oomguard", "events", "--kind", "r"]) == ["refusal", "run_end"]
    assert complete(unpacked, ["oomguard", "top", "--j"]) == ["--json"]
    assert complete(unpacked, ["oom-protect", "--v"]) == ["--version"]
    # After the command, the command's own completion takes over.
    assert complete(unpacked, ["hypernode-oom-protect", "oomguard", "doc"]) == ["doctor"]
    assert complete(unpacked, ["oom-protect", "--", "oomguard", "setup", "--d"]) == ["--dry-run"]


# ---------------------------------------------------------------- lintian


def test_lintian_reports_nothing_beyond_the_justified_overrides(deb):
    # Every level down to pedantic, experimental tags included.
    r = run(["lintian", "--info", "--show-overrides", "--display-experimental",
             "--display-level", ">=pedantic", str(deb)])
    assert r.returncode == 0, r.stdout + r.stderr
    tags = re.findall(r"^([EWIXPO]): oomguard(?: \w+)?: (\S+)", r.stdout, re.M)
    overridden = set(re.findall(r"^oomguard: (\S+)", OVERRIDES.read_text(), re.M))
    assert {tag for kind, tag in tags if kind == "O"} == overridden
    assert [(kind, tag) for kind, tag in tags if kind != "O"] == []


# ---------------------------------------------------------------- the example config


def uncommented(text: str) -> str:
    """The example with its defaults switched on: "#key = value" and
    "#[table]" lines lose their "#"; prose and examples ("# ...") stay."""
    return "\n".join(line[1:] if re.match(r"#[\[a-z]", line) else line for line in text.splitlines())


# Config field -> its key in the file, where the two differ.
KEY_OF = {
    ("protect", "allow_uids"): "allow_users",
    ("protect", "allow_gids"): "allow_groups",
    ("policy", "classes"): "class",
    ("healer", "windows"): "window",
    ("healer", "checks"): "check",
    ("healer", "services"): "service",
}
SECTIONS = {"protect": config.ProtectConfig, "policy": config.PolicyConfig, "layout": config.LayoutConfig,
            "healer": config.HealerConfig, "events": config.EventsConfig, "metrics": config.MetricsConfig}


def named_keys(text: str) -> set[str]:
    """The dotted keys the example names, as defaults or in examples."""
    table, out = "", set()
    for line in text.splitlines():
        if m := re.match(r"#\s?\[\[?([\w.]+)\]\]?$", line):
            table = m.group(1)
            out.add(table)
        elif m := re.match(r"#\s?(\w+) = ", line):
            out.add(f"{table}.{m.group(1)}" if table else m.group(1))
    return out


def test_the_example_config_switched_on_is_exactly_the_defaults():
    text = EXAMPLE.read_text()
    data = tomllib.loads(uncommented(text))
    assert tomllib.loads(text) == {}  # as shipped, every line is a comment
    # The default app user need not exist on this host: checked on its own.
    assert data["layout"].pop("app_user") == config.LayoutConfig.app_user
    assert config.parse(data) == config.Config()


def test_the_example_config_names_every_key():
    keys = named_keys(EXAMPLE.read_text())
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            key = KEY_OF.get((section, f.name), f.name)
            assert f"{section}.{key}" in keys, f"{section}.{key}"
    assert {"daemon.state_dir", "daemon.log_level"} <= keys
    # The tables' own keys, as the examples show them.
    for key in ("name", "oom_score_adj", "user", "unit", "essential", "healer_exempt"):
        assert f"policy.class.{key}" in keys, key
    for key in ("name", "http", "interval", "timeout", "failures", "status"):
        assert f"healer.check.{key}" in keys, key
    assert {"healer.window.from", "healer.window.to", "healer.window.grace",
            "healer.service.name", "healer.service.restart"} <= keys
    for table, cls in (("notify.exec", config.ExecHook), ("notify.webhook", config.WebhookHook)):
        for f in dataclasses.fields(cls):
            key = {"uid": "user", "gid": "group"}.get(f.name, f.name)
            assert f"{table}.{key}" in keys, f"{table}.{key}"


# ---------------------------------------------------------------- the dependency lists


def bash_array(path: Path, name: str) -> set[str]:
    """The words of a bash array assignment ``NAME=( ... )``, comments dropped."""
    body = re.search(rf"^{name}=\((.*?)^\)", path.read_text(), re.M | re.S).group(1)
    return {line.split("#")[0].strip() for line in body.splitlines()} - {""}


def test_build_deb_installs_every_build_dependency_and_the_test_deps_list_has_them():
    control = (REPO / "debian" / "control").read_text()
    build_depends = re.search(r"^Build-Depends:(.*?)^\S", control, re.M | re.S).group(1)
    wanted = {re.split(r"[ (]", d.strip())[0] for d in build_depends.split(",")} - {""}
    # Virtual names and the packages that provide them.
    provided = {"debhelper-compat": "debhelper", "dh-sequence-python3": "dh-python"}
    wanted = {provided.get(d, d) for d in wanted} | {"dpkg-dev", "lintian", "python3-prometheus-client"}
    build_deb = bash_array(REPO / "scripts" / "build-deb", "BUILD_DEPS")
    assert wanted <= build_deb, wanted - build_deb
    test_deps = bash_array(REPO / "scripts" / "install-test-deps", "APT_PACKAGES")
    assert build_deb | {"man-db", "bash-completion"} <= test_deps
