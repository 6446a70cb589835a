"""The single exception type that decoding and verification raise for bad input."""
from __future__ import annotations

from typing import Final

# Rejection reasons, in the order the validator checks them (it counts rejections per reason).
REASONS: Final = ("size", "decode", "signature", "sender", "swarm", "version")


class ProtocolError(ValueError):
    """Input from a peer (or a record we are about to send) breaks the protocol.

    `reason` is one of REASONS so callers can count rejections without parsing messages.
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown ProtocolError reason {reason!r}")
        super().__init__(message or f"rejected: {reason}")
        self.reason = reason

    def __reduce__(self) -> tuple:  # copy/deepcopy would otherwise call ProtocolError(message)
        return (type(self), (self.reason, str(self)))

    def __repr__(self) -> str:
        return f"ProtocolError(reason={self.reason!r}, {str(self)!r})"
