"""`oomguard`: the admin command line (``commands``).

``oomguard motd`` runs at every login shell, so it is routed here before the
rest of the command line (argparse, the config schema) is imported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["motd"]:
        from oomguard.cli import motd

        return motd.main()
    from oomguard.cli import commands

    return commands.main(args)
