"""The root broker behind oom-protect: the socket, requests and grants.

``protocol`` (the wire format and its field checks), ``peer`` (who connected,
pinned), ``grant`` (the privileged act), ``placement`` (the run's cgroup or
systemd scope), ``workers`` (the fair pool slow ops run in), ``cache`` (one
computation shared by callers within a moment), ``server`` (the loop).
"""

from oomguard.broker.grant import Granter, Pending, tty_path
from oomguard.broker.peer import Peer, is_allowed, peer_credentials, pin, refusal_text
from oomguard.broker.placement import systemd_scope_argv
from oomguard.broker.protocol import Refusal, encode, parse_request
from oomguard.broker.server import Broker, Handler

__all__ = [
    "Broker", "Granter", "Handler", "Peer", "Pending", "Refusal", "encode", "is_allowed",
    "parse_request", "peer_credentials", "pin", "refusal_text",
    "systemd_scope_argv", "tty_path",
]  # fmt: skip
