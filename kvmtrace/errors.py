"""User-facing errors: one line, an actionable fix, exit status 2."""

from __future__ import annotations

__all__ = ["KvmtraceError", "UsageError", "MissingFeature", "OutputError"]


class KvmtraceError(Exception):
    """An error the user can act on; the CLI prints it as one line and exits with ``status``."""

    status = 2

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} (fix: {self.fix})" if self.fix else self.message


class UsageError(KvmtraceError):
    """A bad flag or argument value."""


class MissingFeature(KvmtraceError):
    """The host lacks something kvmtrace needs (root, /dev/kvm, tracefs, bcc, a tracepoint)."""


class OutputError(KvmtraceError):
    """Writing output failed part-way (disk full, I/O error); what was written is kept."""

    status = 1
