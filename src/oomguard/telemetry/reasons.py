"""Why the broker declined a request: one enum for the broker and the metrics."""

from __future__ import annotations

from enum import StrEnum


class RefusalReason(StrEnum):
    NOT_ALLOWED = "not_allowed"  # the user may not be protected
    GONE = "gone"  # the asking process exited (or its pid was reused)
    IDENTITY = "identity"  # credentials changed between connect and grant
    BUSY = "busy"  # per-user or global connection cap reached
    LIMIT = "limit"  # the user already has as many active runs as allowed
    NESTED = "nested"  # the asking process is already inside another active run
    SHARED_MM = "shared_mm"  # another process shares the asker's mm (CLONE_VM): it would be protected too
    INVALID = "invalid"  # malformed request
    ERROR = "error"  # the broker could not carry out the grant
    REFUSED = "refused"  # any other refusal of a query

    @classmethod
    def parse(cls, text: str) -> RefusalReason:
        """The member named ``text``; REFUSED for anything else."""
        try:
            return cls(text)
        except ValueError:
            return cls.REFUSED
