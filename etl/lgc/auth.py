"""LetsGetChecked authentication: OAuth2 client credentials, one token shared by a whole load.

`POST {base}/oauth2/token?grant_type=client_credentials` with HTTP Basic (access key, secret
key) and a form-urlencoded body answers `{"access_token": <JWT>, "expires_in": <seconds>}`.
The token is fetched once and shared by every concurrent request of a load (an asyncio lock
makes the first caller fetch while the others wait), reused until shortly before it expires,
and refreshed at most once per stale token when a PUT answers 401: many requests failing with
the same stale token trigger one refresh, not one each.

With `LGC_API_TOKEN` (a ready token) there is nothing to refresh: a 401 is final.
Tokens never appear in logs or exception messages.

`TokenProvider` is an `httpx.Auth` (as httpx and dlt model auth): every LetsGetChecked request is
sent with `auth=` it, and its flow is the only place the 401 rule lives: the bearer token goes on
the request; a 401 gets one refresh (shared by every request that held the stale token) and one
more try; what the second try answers is the caller's to classify.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator

import httpx

from etl.errors import ApiError, AuthError
from etl.http import (
    NO_COMPRESSION,
    TOKEN_ANSWER_LIMIT,
    RetryableStatus,
    access_token_from,
    asend_capped,
    async_retrying,
    capped_stream,
    describe_transport_error,
    raise_for_retryable,
    unreachable,
)
from etl.settings import LgcSettings, RetrySettings

log = logging.getLogger(__name__)

TOKEN_PATH = "/oauth2/token"
DEFAULT_EXPIRES_IN = 300.0  # if the server omits expires_in, assume a short life
MAX_EARLY_REFRESH = 60.0  # refresh this many seconds before expiry (at most 10% of the life)


class TokenProvider(httpx.Auth):
    """LetsGetChecked's auth: hands out a bearer token, fetches/refreshes it under a lock so it
    happens once, and (as an httpx.Auth) puts it on each request and retries once after a 401.
    `http`: the client that fetches tokens (given here, or bound by the first client that sends
    with this auth)."""

    def __init__(self, lgc: LgcSettings, retry: RetrySettings, http: httpx.AsyncClient | None = None, *,
                 clock=time.monotonic) -> None:
        self._lgc = lgc
        self._retry = retry
        self.http = http
        self._clock = clock
        self._lock = asyncio.Lock()
        self._token: str | None = lgc.api_token
        self._expires_at: float = float("inf") if lgc.api_token else 0.0
        self.fetches = 0  # how many times the token endpoint was called (tests, logs)

    @property
    def static(self) -> bool:
        """True with LGC_API_TOKEN: the token cannot be refreshed."""
        return bool(self._lgc.api_token)

    def _fresh(self) -> bool:
        return self._token is not None and self._clock() < self._expires_at

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """The bearer token on the request; after a 401, one refresh and one more try. The 401's
        body is read (httpx reads it before the next try) under the answer cap."""
        used = await self.token()
        request.headers["Authorization"] = f"Bearer {used}"
        response = yield request
        if response.status_code != 401:
            return
        fresh = await self.refresh(None, used)
        if fresh is None:  # a ready LGC_API_TOKEN cannot be refreshed: the 401 is the answer
            return
        log.info("LetsGetChecked answered 401; retrying once with a fresh token")
        response.stream = capped_stream(response.stream, self._lgc.max_response_bytes)
        request.headers["Authorization"] = f"Bearer {fresh}"
        yield request

    def sync_auth_flow(self, request: httpx.Request):  # pragma: no cover - labsync's LGC calls are async
        raise RuntimeError("LetsGetChecked requests are sent by an httpx.AsyncClient")

    def _client(self, client: httpx.AsyncClient | None) -> httpx.AsyncClient:
        client = client or self.http
        if client is None:
            raise RuntimeError("TokenProvider has no client to fetch tokens with")
        self.http = self.http or client
        return client

    async def token(self, client: httpx.AsyncClient | None = None) -> str:
        """A valid token, fetching one (through `client`, else the bound one) if there is none
        or it is about to expire."""
        if self._fresh():
            return self._token  # type: ignore[return-value]
        async with self._lock:
            if not self._fresh():
                await self._fetch(self._client(client))
            return self._token  # type: ignore[return-value]

    async def refresh(self, client: httpx.AsyncClient | None, stale: str) -> str | None:
        """After a 401 with `stale`: a new token (fetched once however many requests saw the
        401), or None when the token cannot be refreshed (a static LGC_API_TOKEN)."""
        if self.static:
            return None
        async with self._lock:
            if self._token != stale and self._fresh():
                return self._token  # someone else already refreshed
            await self._fetch(self._client(client))
            return self._token

    async def _fetch(self, client: httpx.AsyncClient) -> None:
        if self.static:
            return
        auth = httpx.BasicAuth(self._lgc.access_key or "", self._lgc.secret_key or "")
        url = f"{self._lgc.base_url}{TOKEN_PATH}"
        try:
            cap = self._lgc.max_retry_after  # a token endpoint asking for hours fails now
            async for attempt in async_retrying(self._retry, max_retry_after=cap):
                with attempt:
                    request = client.build_request(
                        "POST", url,
                        params={"grant_type": "client_credentials"},
                        data={"grant_type": "client_credentials"},
                        headers={"Accept": "application/json", **NO_COMPRESSION},
                    )
                    response = raise_for_retryable(
                        await asend_capped(client, request, TOKEN_ANSWER_LIMIT, auth=auth),
                        max_retry_after=cap)
        except (RetryableStatus, httpx.TransportError) as exc:
            raise unreachable("LetsGetChecked", self._lgc.base_url, "LGC_BASE_URL", exc) or ApiError(
                f"could not get a LetsGetChecked token: {describe_transport_error(exc)}"
            ) from None
        if response.status_code in (400, 401, 403):
            raise AuthError(
                f"LetsGetChecked refused the credentials at the token endpoint (HTTP "
                f"{response.status_code}); check LGC_ACCESS_KEY and LGC_SECRET_KEY",
                status=response.status_code,
            )
        if response.status_code != 200:
            raise ApiError(
                f"the LetsGetChecked token endpoint answered HTTP {response.status_code}",
                status=response.status_code,
            )
        token, data = access_token_from(response)  # never `Bearer None` or a header-breaking token
        if token is None:
            raise ApiError("the LetsGetChecked token endpoint answered without a usable access token")
        try:
            expires_in = float(data.get("expires_in") or DEFAULT_EXPIRES_IN)
        except (ValueError, TypeError):
            expires_in = DEFAULT_EXPIRES_IN
        early = min(MAX_EARLY_REFRESH, expires_in * 0.1)
        self._token = token
        self._expires_at = self._clock() + max(0.0, expires_in - early)
        self.fetches += 1
        log.info("LetsGetChecked token obtained (valid %.0fs)", expires_in)
