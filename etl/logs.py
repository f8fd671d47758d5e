"""Logging setup shared by the CLI and the DAGs.

Rule of the house: log clientOrderId, batch names and line numbers, never names, dates of birth,
emails, phones or tokens. Every record labsync's loggers create passes through the one
redaction point (`etl.redact.clean`): token-shaped strings are masked and control characters
escaped, so a file name with a newline cannot forge a second log line.

Why a record factory rather than a logging.Filter: a filter on the `etl` logger never sees the
records of its children (`etl.orders.inbox`, ...), and a filter on handlers only covers the
handlers we install, not Airflow's task handlers or pytest's. The factory runs when any record
is created, whoever handles it. Records of other libraries (httpx prints URLs) get their tokens
masked too, but keep their own line breaks.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from etl.redact import clean, escape_controls, redact_tokens

__all__ = ["DEBUG", "QUIET", "NORMAL", "VERBOSE", "cli_session", "configure", "console", "counts_text", "escape_controls", "install", "level",
           "redact_secrets"]

_installed = False
_lock = threading.Lock()
_OURS = ("etl", "dags")


def redact_secrets(text: str) -> str:
    """Mask bearer tokens, secret query parameters and other token-shaped strings in text."""
    return redact_tokens(text)


def _ours(name: str | None) -> bool:
    name = name or ""  # logging.makeLogRecord (e.g. structlog's bridge) may leave it None
    return any(name == p or name.startswith(p + ".") for p in _OURS)


def counts_text(counts, order=()) -> str:
    """`accepted 3, rejected 1`: counts per outcome as a person reads them (never a dict repr),
    the names in `order` first, zeros left out; `nothing` when all are zero."""
    counts = dict(counts or {})
    keys = [k for k in order if k in counts] + sorted(k for k in counts if k not in order)
    return ", ".join(f"{k} {counts[k]}" for k in keys if counts[k]) or "nothing"


def install() -> None:
    """Route every log record through the redaction point (idempotent). `configure` does this;
    Airflow tasks, whose logging Airflow sets up, call it directly (etl.airflow.tasks)."""
    global _installed
    with _lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args, **kwargs) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            try:
                message = record.getMessage()
            except Exception:  # a malformed call: leave it to logging's own error report
                return record
            safe = clean(message, limit=None) if _ours(record.name) else redact_tokens(message)
            if safe != message or record.args:
                record.msg, record.args = safe, None
            return record

        logging.setLogRecordFactory(factory)
        # httpx logs every request's full URL at INFO: ids in paths, and signed result links
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        _installed = True


# ---- the CLI's console: log lines above the progress bars, never through them -------------------
# One rich Console on stderr for the whole process: progress bars draw on it (etl.commands.progress)
# and the CLI's log handler prints through it, so while a bar is live rich prints each log line
# above the bar and redraws the bar below it, instead of two writers cutting into each other.
# The CLI prints its results on stdout; log lines on stderr tell how it got there. By default only
# warnings and errors (a file left aside, a retry given up); -v the narrative (INFO, what the
# Airflow task logs show), -vv every order and page (DEBUG); -q errors only and no bars.
QUIET, NORMAL, VERBOSE, DEBUG = logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG
_console = None
_level = NORMAL


def console():
    """The process's stderr console (rich), shared by log lines and progress bars."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True, highlight=False, soft_wrap=True)
    return _console


def level() -> int:
    """The verbosity the CLI runs at (QUIET, NORMAL, VERBOSE or DEBUG): no progress bars in QUIET."""
    return _level


def serving() -> None:
    """A long-running server command (sandbox, webhook receiver): its INFO lines (each delivery
    received) are what a person watching it wants, so NORMAL shows them; -q still hides them."""
    global _level
    if _level == NORMAL:
        configure(VERBOSE)
        _level = NORMAL  # what the user chose, for everything but these log lines


class ConsoleHandler(logging.Handler):
    """Prints each record as one plain line through the shared console (above a live progress
    bar). The message has passed the redaction point already (the record factory above)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            out = console()
            if out.is_terminal:
                out.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
            else:  # a file or pipe: the bare line, no rich wrapping or styling
                out.file.write(line + "\n")
                out.file.flush()
        except Exception:  # pragma: no cover - logging must never break a command
            self.handleError(record)


class PlainFormatter(logging.Formatter):
    """`05:13:36 warning  inbox: left notes.txt where it is (not a .csv file)`: time, level,
    message, on one line; the logger's module path is left out (it helps no reader)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        saved = record.levelname
        record.levelname = saved.lower()
        try:
            text = super().format(record)
        finally:
            record.levelname = saved
        return text.replace("\n", " | ")  # one line, always (a traceback of another library too)


@contextlib.contextmanager
def cli_session() -> Iterator[None]:
    """Logging as one CLI run sets it, undone afterwards: `etl.cli.main` called in a process that
    goes on (a test, a program embedding labsync) leaves that process's logger levels, handlers
    and verbosity as it found them."""
    global _level
    root = logging.getLogger()
    names = ("", *_OURS, "httpx", "httpcore", "alembic")
    levels = {name: logging.getLogger(name).level for name in names}
    handlers, level = list(root.handlers), _level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
        for name, value in levels.items():
            logging.getLogger(name).setLevel(value)
        _level = level


def _ours_installed(root: logging.Logger) -> ConsoleHandler | None:
    return next((h for h in root.handlers if isinstance(h, ConsoleHandler)), None)


def configure(level: int = VERBOSE) -> None:
    """Configure logging for the CLI (idempotent; a second call changes the level): every record
    through the redaction point, `etl` at `level` (INFO unless told: the CLI passes the level its
    -q/-v options chose), and, unless something else (pytest, an
    embedding program) already handles the root logger, one plain line per record on stderr
    through the shared console. httpx's own request logs stay silenced: they print full URLs,
    which can carry identifiers we do not want in logs."""
    global _level
    install()
    _level = level
    root = logging.getLogger()
    handler = _ours_installed(root)
    if handler is None and not root.handlers:
        handler = ConsoleHandler()
        handler.setFormatter(PlainFormatter())
        root.addHandler(handler)
    if handler is not None:  # other libraries: warnings only; ours: `level` (they propagate)
        root.setLevel(logging.WARNING)
        handler.setLevel(level)
    for name in _OURS:
        logging.getLogger(name).setLevel(level)
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
