"""Every exception labsync raises, in one tree: the ones users see (LabsyncError and its
subclasses: plain sentences, an exit code each, never PHI or secrets), and the few signals that
pass between the steps of one operation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx


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


class WarehouseRefused(LabsyncError):
    """The warehouse refused one item's write (a constraint, a trigger, a value it cannot hold):
    that item failed, the run goes on (exit 2 where it ends a command). The message names the
    table and the driver's error class only: the driver's text can quote the row, which holds
    PHI."""

    exit_code = 2


class UnsafeIdError(LabsyncError):
    """An id that cannot travel in a URL path exactly as written (exit code 2). The message
    names the id (ids are not PHI) with control characters escaped."""

    exit_code = 2


class Interrupted(LabsyncError):
    """Ctrl-C (SIGINT) or SIGTERM stopped a command; claimed rows were released (exit 130)."""

    exit_code = 130


# ---- what the vendor clients raise ---------------------------------------------------------------
class RupaApiError(ApiError):
    """Rupa answered with a JSON:API error document (or an unusable one). `errors` keeps the
    documents' error objects; the message keeps only their structured parts (etl.redact)."""

    def __init__(self, message: str, *, status: int | None = None, errors: list[dict] | None = None) -> None:
        super().__init__(message, status=status)
        self.errors = errors or []

    @property
    def codes(self) -> list[str]:
        return [str(e.get("code")) for e in self.errors if isinstance(e, dict) and e.get("code")]


class RupaPageLoop(RupaApiError):
    """`links.next` led back to a page this run already read. The stored resume point is
    dropped (links from a looping server are not trusted): the next run starts over."""


class RupaPageBudget(RupaApiError):
    """The run read RUPA_MAX_PAGES pages without reaching the end. The resume point is kept, so
    a clinic that really is that big is finished by later runs."""


# ---- what the flows raise ------------------------------------------------------------------------
class LostClaim(LabsyncError):
    """Another run took this batch over (our lease lapsed): stop working on it, touch nothing."""


class StorageUnavailable(LabsyncError):
    """The inbox's store cannot be reached or refused us (exit 2: fix the URL or credentials)."""

    exit_code = 2


class BatchesNeedAttention(LabsyncError):
    """A run ended with incomplete batches or unusable files (exit 1; the DAG run fails)."""


class PayloadError(ValueError):
    """A row that passed validation but cannot be mapped (a bug upstream). PHI-free message."""


class BadEvent(ValueError):
    """A webhook event we cannot read; the message is PHI-free."""


class DownloadFailed(Exception):
    """A result document could not be downloaded (the message says why, without the link)."""


# ---- signals inside one step (never reach a user as such) ----------------------------------------
class RetryableStatus(Exception):
    """A response whose status says 'try again later' (etl.http's retry policy retries it).
    Carries the response for the caller."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


class RetryAfterTooLong(RetryableStatus):
    """A 'try again later' whose Retry-After asks for more than the caller's cap: not retried."""

    def __init__(self, response: httpx.Response, asked: float, cap: float) -> None:
        super().__init__(response)
        self.asked, self.cap = asked, cap


class Refused(Exception):
    """A link from outside (a result file's URL) labsync will not fetch: its message says why,
    naming at most the origin (etl.http.OriginPolicy)."""


class AddressRefused(Refused):
    """The host of a link resolves to an address labsync does not connect to (loopback, private,
    link-local, metadata)."""


class OverCap(Exception):
    """An answer larger than the cap (on the wire or decoded): not kept."""


class Aborted(Exception):
    """The wait for the vendor budget was cut short by the caller's `abort` future."""


class Tripped(Exception):
    """Raised instead of starting a request once the load's breaker is open or its deadline
    passed (etl.lgc.breaker)."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class BodyTooLarge(Exception):
    """A webhook delivery larger than LABSYNC_WEBHOOK_MAX_BYTES (answered 413)."""


class CheckProblem(Exception):
    """A `labsync doctor` check's finding: what is wrong and what to do."""

    def __init__(self, detail: str, fix: str = "") -> None:
        super().__init__(detail)
        self.detail, self.fix = detail, fix


def size_text(n: int) -> str:
    """`1 MiB`, `512 KiB`, `300 bytes`."""
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"
