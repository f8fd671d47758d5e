"""Logging setup shared by the CLI and the DAGs.

Rule of the house: log clientOrderId, batch names and line numbers, never names, dates of birth,
emails, phones or tokens. `redact_secrets` is a last line of defence for tokens in URLs/headers.
"""

from __future__ import annotations

import logging
import re

_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_SECRET_QS = re.compile(r"(?i)((?:access_token|refresh_token|client_secret|code)=)[^&\s]+")


def redact_secrets(text: str) -> str:
    """Mask bearer tokens and secret query parameters in a piece of text."""
    return _SECRET_QS.sub(r"\1***", _BEARER.sub(r"\1***", text))


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact_secrets(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def configure(level: int = logging.INFO) -> None:
    """Configure the `etl` logger once (idempotent). httpx's own request logs are silenced:
    they print full URLs, which can carry identifiers we do not want in logs."""
    logger = logging.getLogger("etl")
    if not any(isinstance(f, _RedactingFilter) for f in logger.filters):
        logger.addFilter(_RedactingFilter())
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(level)
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
