"""The unit files `oomguard setup` owns: written only when they change, a
file of someone else's kept aside, and all of it undone by ``--uninstall``.

A file is ours when it starts with ``HEADER``. One that is not (an admin's
own drop-in at the same path) is renamed to ``NAME.oomguard-saved`` before
ours replaces it, and put back on uninstall.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HEADER = "# Written by `oomguard setup`; rerunning it overwrites this file.\n"
SAVED_SUFFIX = ".oomguard-saved"


@dataclass(frozen=True)
class FileChange:
    path: Path
    action: str  # "wrote", "unchanged", "removed", "restored", "absent"

    def line(self) -> str:
        return f"{self.action} {self.path}"


def target_of(path: str, root: str | os.PathLike[str] | None) -> Path:
    return Path(root, path.lstrip("/")) if root else Path(path)


def _read(p: Path) -> str | None:
    try:
        return p.read_text()
    except FileNotFoundError:
        return None


def write_files(files: dict[str, str], root: str | os.PathLike[str] | None = None) -> list[FileChange]:
    """Write each file that differs, atomically; say what happened to each."""
    changes = []
    for path, text in sorted(files.items()):
        target = target_of(path, root)
        old = _read(target)
        if old == text:
            changes.append(FileChange(target, "unchanged"))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        saved = target.with_name(target.name + SAVED_SUFFIX)
        if old is not None and not old.startswith(HEADER) and not saved.exists():
            os.replace(target, saved)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        changes.append(FileChange(target, "wrote"))
    return changes


def remove_files(paths: list[str], root: str | os.PathLike[str] | None = None) -> list[FileChange]:
    """Remove the files of ours among ``paths``, put back what they replaced,
    and drop the drop-in directories that are left empty."""
    changes = []
    for path in sorted(paths):
        target = target_of(path, root)
        saved = target.with_name(target.name + SAVED_SUFFIX)
        text = _read(target)
        if text is not None and text.startswith(HEADER):
            target.unlink()
            changes.append(FileChange(target, "removed"))
        elif text is None and not saved.exists():
            changes.append(FileChange(target, "absent"))
        if saved.exists():
            os.replace(saved, target)
            changes.append(FileChange(target, "restored"))
        parent = target.parent
        if parent.name.endswith(".d"):
            try:
                parent.rmdir()
            except OSError:
                pass  # not empty: someone else's drop-ins live there too
    return changes
