"""`oomguard`: the admin command line (``commands``).

``oomguard motd`` runs at every login shell, and `runs`, `events` and
`status` are what an admin types most, so they are routed here before the
rest of the command line (argparse, the config schema) is imported: motd
directly, the queries through ``fast`` whenever it can answer exactly as
the argparse path would.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # importing typing for it would cost every command 4 ms

if TYPE_CHECKING:
    from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["motd"]:
        from oomguard.cli import motd

        return motd.main()
    if args[:1] in (["runs"], ["events"], ["status"], ["top"], ["--config"]):
        from oomguard.cli import fast

        rc = fast.run(args)
        if rc is not None:
            return rc
    from oomguard.cli import commands

    return commands.main(args)
