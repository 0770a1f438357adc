"""The layers, enforced: imports flow one way, and only host/ touches the OS.

Read with ``ast``, so nothing is imported or run. The README's architecture
section describes the same order.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "oomguard"

# Lower rank first; a layer imports only from lower ranks or from itself.
# Layers that share a rank are peers and never import each other.
RANK = {
    "host": 0,
    "config": 1,
    "telemetry": 1,
    "runs": 2,
    "prefs": 2,
    "policy": 3,
    "forensics": 3,
    "broker": 3,
    "healer": 3,
    "notify": 3,
    "socketops": 4,
    "daemon": 5,
    "cli": 6,
}
# What only host/ may name: the kernel's files, the user database, netlink,
# systemd's tools. protect.py is the stdlib-only client and reads its own
# /proc/self files; it is imported by nothing, so it is exempt.
OS_PATHS = ("/proc", "/sys/fs/cgroup", "/dev/kmsg", "/etc/passwd", "/etc/group", "/etc/login.defs")
OS_MODULES = {"pwd", "grp"}
OS_NAMES = {"AF_NETLINK", "NETLINK_CONNECTOR"}
OS_TOOLS = {"systemctl", "busctl", "systemd-run"}
EXEMPT = {"protect"}


def layer_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    return rel.parts[0] if rel.parts[0] != "__init__" else "__init__"


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                raise AssertionError(f"line {node.lineno}: relative import (use oomguard.LAYER...)")
            if node.module == "oomguard":
                out += [(node.lineno, f"oomguard.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def violations(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        layer = layer_of(path, root)
        name = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(), str(path))
        for line, mod in _imported(tree):
            top = mod.split(".")[0]
            if top in OS_MODULES and layer not in ("host", *EXEMPT):
                found.append(f"{name}:{line}: imports {mod}, which only host/ may use")
            if top != "oomguard" or mod == "oomguard.__version__":
                continue
            target = mod.split(".")[1] if "." in mod else "__init__"
            if target == "protect":
                found.append(f"{name}:{line}: imports oomguard.protect, which nothing may import")
            elif layer in EXEMPT:
                found.append(f"{name}:{line}: the client imports {mod}")
            elif layer == "__init__":
                found.append(f"{name}:{line}: the package root imports {mod}")
            elif target != layer and RANK.get(target, 99) >= RANK[layer]:
                found.append(f"{name}:{line}: {layer} imports {mod}, a layer at or above it")
        if layer in ("host", *EXEMPT):
            continue
        for line, text in _strings(tree):
            if any(text == p or text.startswith(p + "/") for p in OS_PATHS):
                found.append(f"{name}:{line}: names {text!r}, which only host/ may open")
            elif text in OS_TOOLS or text in OS_NAMES:
                found.append(f"{name}:{line}: runs or names {text!r}, which only host/ may use")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in OS_NAMES:
                found.append(f"{name}:{node.lineno}: uses {node.attr}, which only host/ may use")
    return found


# Where the tree still breaks the rules while the layout lands in steps; each
# step that mends one deletes its line. The list only shrinks.
KNOWN: set[str] = set()


def _unlined(v: str) -> str:
    name, _line, rest = v.split(":", 2)
    return f"{name}:{rest}"


def test_the_tree_keeps_its_layers() -> None:
    known = {_unlined(v) for v in KNOWN}
    new = [v for v in violations(SRC) if _unlined(v) not in known]
    assert new == []


def test_every_module_belongs_to_a_layer() -> None:
    layers = {layer_of(p, SRC) for p in SRC.rglob("*.py")}
    assert layers <= set(RANK) | EXEMPT | {"__init__"}, layers - set(RANK)


def test_a_planted_upward_import_and_os_access_are_caught(tmp_path: Path) -> None:
    root = tmp_path / "oomguard"
    shutil.copytree(SRC, root)
    (root / "host" / "planted.py").write_text("from oomguard.healer import grace\n")
    (root / "runs" / "planted.py").write_text(
        'import pwd\nfrom oomguard.policy import rules\nopen("/proc/self/stat")\n'
        'X = f"/sys/fs/cgroup/{1}"\nY = "/dev/kmsg"\n'
    )
    (root / "healer" / "planted.py").write_text("from oomguard.broker import server\n")
    (root / "cli" / "planted.py").write_text("from oomguard import protect\n")
    (root / "policy" / "planted.py").write_text('import subprocess\nsubprocess.run(["systemctl", "restart", "x"])\n')
    baseline = set(violations(SRC))
    found = [v for v in violations(root) if v not in baseline]
    assert any(v.startswith("host/planted.py:1: host imports oomguard.healer") for v in found), found
    assert any(v.startswith("runs/planted.py:1: imports pwd") for v in found), found
    assert any(v.startswith("runs/planted.py:2: runs imports oomguard.policy") for v in found), found
    assert any(v.startswith("runs/planted.py:3: names '/proc/self/stat'") for v in found), found
    assert any(v.startswith("runs/planted.py:4: names '/sys/fs/cgroup/'") for v in found), found
    assert any(v.startswith("runs/planted.py:5: names '/dev/kmsg'") for v in found), found
    assert any(v.startswith("healer/planted.py:1: healer imports oomguard.broker") for v in found), found
    assert any(v.startswith("cli/planted.py:1: imports oomguard.protect") for v in found), found
    assert any(v.startswith("policy/planted.py:2: runs or names 'systemctl'") for v in found), found
    assert len(found) == 9, found
