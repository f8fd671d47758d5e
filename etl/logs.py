"""Logging setup shared by the CLI and the DAGs.

Rule of the house: log clientOrderId, batch names and line numbers, never names, dates of birth,
emails, phones or tokens. Every record labsync's loggers create passes through the one
redaction point (`etl.redact.clean`): token-shaped strings are masked and control characters
escaped, so a file name with a newline cannot forge a second log line.

Why a record factory rather than a logging.Filter: a filter on the `etl` logger never sees the
records of its children (`etl.batches.inbox`, ...), and a filter on handlers only covers the
handlers we install, not Airflow's task handlers or pytest's. The factory runs when any record
is created, whoever handles it. Records of other libraries (httpx prints URLs) get their tokens
masked too, but keep their own line breaks.
"""

from __future__ import annotations

import logging
import threading

from etl.redact import clean, escape_controls, redact_tokens

__all__ = ["configure", "escape_controls", "install", "redact_secrets"]

_installed = False
_lock = threading.Lock()
_OURS = ("etl", "dags")


def redact_secrets(text: str) -> str:
    """Mask bearer tokens, secret query parameters and other token-shaped strings in text."""
    return redact_tokens(text)


def _ours(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _OURS)


def install() -> None:
    """Route every log record through the redaction point (idempotent). `configure` does this;
    Airflow tasks, whose logging Airflow sets up, call it directly (etl.tasks)."""
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


def configure(level: int = logging.INFO) -> None:
    """Configure the `etl` logger once (idempotent). httpx's own request logs are silenced:
    they print full URLs, which can carry identifiers we do not want in logs."""
    install()
    logger = logging.getLogger("etl")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(level)
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
