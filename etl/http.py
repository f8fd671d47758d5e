"""The shared HTTP plumbing: httpx client factories and the one retry policy.

Both vendor clients retry the same things the same way: 429, 500, 502, 503, 504, timeouts and
broken connections, with exponential backoff and full jitter, honouring `Retry-After` when the
server sends one, up to `RetrySettings.max_attempts`. Everything else is the caller's to handle.

Usage (sync or async)::

    for attempt in retrying(settings.retry):
        with attempt:
            response = raise_for_retryable(client.get(url))

`attempt.retry_state.attempt_number` tells how many tries were made.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable

import httpx
import tenacity
from tenacity import wait_random_exponential

from etl import __version__
from etl.settings import RetrySettings

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 300.0  # never sleep longer than this on a server's say-so
USER_AGENT = f"labsync/{__version__}"


class RetryableStatus(Exception):
    """A response whose status says 'try again later'. Carries the response for the caller."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def raise_for_retryable(response: httpx.Response) -> httpx.Response:
    """Return the response unless its status is one the retry policy retries."""
    if response.status_code in RETRYABLE_STATUSES:
        raise RetryableStatus(response)
    return response


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, RetryableStatus | httpx.TransportError)


def is_retryable_unsent(exc: BaseException) -> bool:
    """Retryable *and* surely not processed: a 429, or a connection that never carried the
    request. For requests that are not idempotent (Rupa's POST /order_intents): any other
    failure may have been processed, so the caller records an unknown outcome instead."""
    if isinstance(exc, RetryableStatus):
        return exc.response.status_code == 429
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP-date), else None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class wait_retry_after_or_backoff(tenacity.wait.wait_base):
    """Wait what the server asked for in Retry-After, else exponential backoff with full jitter."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.backoff = wait_random_exponential(multiplier=initial, max=maximum)

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, RetryableStatus):
            asked = parse_retry_after(exc.response.headers.get("Retry-After"))
            if asked is not None:
                return min(asked, MAX_RETRY_AFTER)
        return self.backoff(retry_state)


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, RetryableStatus):
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__ if exc else "unknown"


def _log_retry(retry_state: tenacity.RetryCallState) -> None:
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    wait = retry_state.next_action.sleep if retry_state.next_action else 0
    log.info("retrying after %s (attempt %d, waiting %.2fs)", _describe(exc), retry_state.attempt_number, wait)


def retry_kwargs(settings: RetrySettings, *, sleep: Callable | None = None,
                 retry_on: Callable[[BaseException], bool] = is_retryable) -> dict:
    kwargs = dict(
        stop=tenacity.stop_after_attempt(settings.max_attempts),
        wait=wait_retry_after_or_backoff(settings.initial_wait, settings.max_wait),
        retry=tenacity.retry_if_exception(retry_on),
        before_sleep=_log_retry,
        reraise=True,
    )
    if sleep is not None:
        kwargs["sleep"] = sleep
    return kwargs


def retrying(settings: RetrySettings, **kw) -> tenacity.Retrying:
    return tenacity.Retrying(**retry_kwargs(settings, **kw))


def async_retrying(settings: RetrySettings, **kw) -> tenacity.AsyncRetrying:
    return tenacity.AsyncRetrying(**retry_kwargs(settings, **kw))


def _limits(concurrency: int) -> httpx.Limits:
    return httpx.Limits(max_connections=max(concurrency, 1), max_keepalive_connections=max(concurrency, 1))


def make_client(base_url: str, settings: RetrySettings, *, concurrency: int = 4, **kw) -> httpx.Client:
    headers = {"User-Agent": USER_AGENT, **kw.pop("headers", {})}
    return httpx.Client(
        base_url=base_url,
        timeout=settings.timeout,
        limits=_limits(concurrency),
        headers=headers,
        **kw,
    )


def make_async_client(
    base_url: str, settings: RetrySettings, *, concurrency: int = 8, **kw
) -> httpx.AsyncClient:
    headers = {"User-Agent": USER_AGENT, **kw.pop("headers", {})}
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=settings.timeout,
        limits=_limits(concurrency),
        headers=headers,
        **kw,
    )


def describe_transport_error(exc: BaseException) -> str:
    """A short, PHI-free description of why a request did not complete."""
    if isinstance(exc, RetryableStatus):
        return f"HTTP {exc.response.status_code} after retries"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.TransportError):
        return f"connection problem ({type(exc).__name__})"
    return type(exc).__name__
