"""The exceptions users see. Messages are plain sentences and never carry PHI or secrets."""

from __future__ import annotations


class LabsyncError(Exception):
    """Base class: an outcome we expected and can explain, not a bug."""

    exit_code = 1


class ConfigError(LabsyncError):
    """Settings are missing or malformed (exit code 2)."""

    exit_code = 2


class UnusableInputError(LabsyncError):
    """An input file cannot be used at all: unreadable, not CSV, required columns missing (exit 2)."""

    exit_code = 2
    sha256: str | None = None  # the file's content hash, once read (etl.intake.validate sets it)


class ApiError(LabsyncError):
    """A vendor API answered in a way we cannot continue from."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthError(ApiError):
    """Credentials were refused (bad keys, revoked or expired refresh token). Exit code 2."""

    exit_code = 2


class Unreachable(ApiError):
    """A vendor could not be reached at all at its configured base URL: connection refused, a
    host name that does not resolve, no answer to connect, a TLS certificate not trusted. A wrong
    URL or a server that is down, not a row's fault: exit 2. The message names the vendor, the
    base URL and the setting that holds it (URLs carry no secrets: user info is refused)."""

    exit_code = 2


class WarehouseUnavailable(LabsyncError):
    """The warehouse went away or refused a write (server down, disk full, read-only): exit 2.
    Nothing is lost: rows whose outcome was not recorded stay in the outbox and go out later."""

    exit_code = 2


class UnsafeIdError(LabsyncError):
    """An id that cannot travel in a URL path exactly as written (exit code 2). The message
    names the id (ids are not PHI) with control characters escaped."""

    exit_code = 2


class Interrupted(LabsyncError):
    """Ctrl-C (SIGINT) or SIGTERM stopped a command; claimed rows were released (exit 130)."""

    exit_code = 130


def size_text(n: int) -> str:
    """`1 MiB`, `512 KiB`, `300 bytes`."""
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"
