"""Rupa OAuth2 (authorization code) and the ready-token mode.

Why the warehouse holds the tokens: Rupa rotates refresh tokens, so the one used for a refresh
stops working the moment the server answers. The new one must be saved before anything else
happens, somewhere every run can read and write: Airflow tasks cannot write Connections, so the
`oauth_tokens` table is that place. A refresh runs under a write lock on the token row, so two
processes (the patients and lab-tests tasks) never spend the same refresh token twice; the
loser of the race simply picks up the winner's fresh token.

Two token sources share one tiny interface (`token()`, `after_401(used)`):
- `StaticToken`: `RUPA_API_TOKEN` / the Airflow extra `access_token`; a 401 is final.
- `OAuthTokens`: refreshes shortly before expiry and once after a 401.

Tokens are encrypted at rest (etl.vault: Fernet, the key from LABSYNC_FERNET_KEY, the Airflow
Variable labsync_fernet_secret, or an embedded SQLite warehouse's key file). A row stored in
plain text by an older labsync is encrypted the first time it is read. This module is the one
writer of `oauth_tokens`: `labsync db rotate-key` re-encrypts the rows through `reseal_tokens`.

A token answer is used only when its access_token is a string that can follow `Bearer ` as it
is (etl.http.access_token_from): never `Bearer None`, never a token that breaks the header.

Nothing here logs or raises with a token, a code or a client secret in the message.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
from sqlalchemy import Connection, Engine, select, update

from etl.errors import ApiError, AuthError, ConfigError
from etl.http import (
    NO_COMPRESSION,
    TOKEN_ANSWER_LIMIT,
    RetryableStatus,
    access_token_from,
    capped_stream,
    describe_transport_error,
    make_client,
    raise_for_retryable,
    retrying,
    send_capped,
    unreachable,
)
from etl.settings import RetrySettings, RupaSettings, Settings
from etl.vault import Vault, vault_for
from etl.warehouse import oauth_tokens, upsert

log = logging.getLogger(__name__)

PROVIDER = "rupa"
MAX_REFRESH_MARGIN = timedelta(seconds=60)  # refresh this long before expiry (at most)

NOT_AUTHORIZED = ("Rupa is not authorized yet: run `labsync rupa authorize` "
                  "(or set RUPA_API_TOKEN to a ready access token)")
REAUTHORIZE = ("Rupa refused the refresh token (revoked, expired or already used); "
               "run `labsync rupa authorize` again")


@dataclass(frozen=True)
class Tokens:
    """An access token, its refresh token and when it expires. repr() never shows the secrets."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    expires_at: datetime | None = None
    issued_at: datetime | None = None

    def needs_refresh(self, now: datetime | None = None) -> bool:
        """True shortly before expiry: a fifth of the lifetime early, at most a minute."""
        if self.expires_at is None:
            return False
        now = now or datetime.now(UTC)
        margin = MAX_REFRESH_MARGIN
        if self.issued_at is not None:
            margin = min(margin, (self.expires_at - self.issued_at) / 5)
        return now >= self.expires_at - margin


def _aware(ts: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return ts.replace(tzinfo=UTC) if ts is not None and ts.tzinfo is None else ts


class TokenStore:
    """The `oauth_tokens` row for one provider, its tokens encrypted by `vault`."""

    def __init__(self, engine: Engine, vault: Vault, provider: str = PROVIDER) -> None:
        self.engine, self.vault, self.provider = engine, vault, provider

    @classmethod
    def for_settings(cls, engine: Engine, settings: Settings) -> TokenStore:
        """ConfigError (before anything is sent) when there is no key for this warehouse."""
        return cls(engine, vault_for(settings.fernet_key, engine))

    def _row(self, conn: Connection):
        return conn.execute(select(oauth_tokens).where(oauth_tokens.c.provider == self.provider)).mappings().first()

    def _read(self, conn: Connection) -> Tokens | None:
        row = self._row(conn)
        if row is None or not row["access_token"]:
            return None
        return Tokens(self.vault.open(row["access_token"]), self.vault.open(row["refresh_token"]),
                      _aware(row["expires_at"]), _aware(row["updated_at"]))

    def load(self) -> Tokens | None:
        with self.engine.connect() as conn:
            row = self._row(conn)
            tokens = self._read(conn)
        if row is not None and tokens is not None and not self.vault.is_sealed(row["access_token"]):
            self._encrypt_plain_row(row)
        return tokens

    def _encrypt_plain_row(self, row) -> None:
        """A row an older labsync stored in plain text: write it back encrypted, unless another
        run changed it meanwhile (then that run's row stands)."""
        with self.engine.begin() as conn:
            conn.execute(update(oauth_tokens)
                         .where(oauth_tokens.c.provider == self.provider,
                                oauth_tokens.c.access_token == row["access_token"])
                         .values(access_token=self.vault.reseal(row["access_token"]),
                                 refresh_token=self.vault.reseal(row["refresh_token"])))
        log.info("encrypted the stored %s tokens at rest", self.provider)

    def save(self, tokens: Tokens, conn: Connection | None = None) -> None:
        row = dict(provider=self.provider, access_token=self.vault.seal(tokens.access_token),
                   refresh_token=self.vault.seal(tokens.refresh_token), expires_at=tokens.expires_at,
                   updated_at=tokens.issued_at or datetime.now(UTC))
        if conn is not None:
            upsert(conn, oauth_tokens, [row], key=["provider"])
            return
        with self.engine.begin() as own:
            upsert(own, oauth_tokens, [row], key=["provider"])

    @contextmanager
    def locked(self) -> Iterator[tuple[Connection, Tokens | None]]:
        """A transaction holding the write lock on the token row (SQLite: the database write
        lock; PostgreSQL: the row lock), and the row as it is now. Commit on exit."""
        with self.engine.begin() as conn:
            conn.execute(update(oauth_tokens).where(oauth_tokens.c.provider == self.provider)
                         .values(updated_at=oauth_tokens.c.updated_at))
            yield conn, self._read(conn)


def reseal_tokens(conn: Connection, vault: Vault) -> int:
    """Every provider's stored tokens encrypted again with the vault's first key (plain rows
    too), in the caller's transaction (`labsync db rotate-key`); how many rows."""
    rows = conn.execute(select(oauth_tokens.c.provider, oauth_tokens.c.access_token,
                               oauth_tokens.c.refresh_token)).all()
    for provider, access, refresh in rows:
        conn.execute(update(oauth_tokens).where(oauth_tokens.c.provider == provider)
                     .values(access_token=vault.reseal(access), refresh_token=vault.reseal(refresh)))
    return len(rows)


class TokenSource(Protocol):
    def token(self) -> str: ...

    def after_401(self, used: str) -> str: ...


class StaticToken:
    """A ready access token (`RUPA_API_TOKEN`): nothing to refresh, so a 401 is final."""

    def __init__(self, token: str) -> None:
        self._token = token

    def token(self) -> str:
        return self._token

    def after_401(self, used: str) -> str:
        raise AuthError("Rupa refused RUPA_API_TOKEN (expired or revoked); set a new one", status=401)


class RupaAuth(httpx.Auth):
    """Rupa's httpx.Auth: the token source's bearer token on every request, and the only place
    the 401 rule lives: a 401 refreshes the token once (`after_401`: a ready token raises
    AuthError there) and tries once more; a second 401 is an AuthError. The 401's body, which
    httpx reads before the next try, is read under `limit`."""

    def __init__(self, source: TokenSource, limit: int) -> None:
        self.source, self.limit = source, limit

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        used = self.source.token()
        request.headers["Authorization"] = f"Bearer {used}"
        response = yield request
        if response.status_code != 401:
            return
        log.info("Rupa answered 401; refreshing the access token once")
        fresh = self.source.after_401(used)
        response.stream = capped_stream(response.stream, self.limit)
        request.headers["Authorization"] = f"Bearer {fresh}"
        response = yield request
        if response.status_code == 401:
            raise AuthError("Rupa refused the access token even after refreshing it; "
                            "run `labsync rupa authorize` again", status=401)

    async def async_auth_flow(self, request: httpx.Request):  # pragma: no cover - Rupa's calls are sync
        raise RuntimeError("Rupa requests are sent by an httpx.Client")
        yield request


# ---- the token endpoint ------------------------------------------------------------------------
def token_endpoint(settings: RupaSettings) -> str:
    return f"{settings.base_url.rstrip('/')}/oauth/token"


def post_grant(http: httpx.Client, settings: RupaSettings, retry: RetrySettings, grant: dict) -> httpx.Response:
    """POST a grant to `{base}/oauth/token` (client credentials in the form body, as Rupa's
    OAuth guide shows) through the shared retry policy; the answer, read under a small cap."""
    form = {**grant, "client_id": settings.client_id or "", "client_secret": settings.client_secret or ""}
    try:
        for attempt in retrying(retry):
            with attempt:
                request = http.build_request("POST", token_endpoint(settings), data=form,
                                             headers={"Accept": "application/json", **NO_COMPRESSION})
                response = raise_for_retryable(send_capped(http, request, TOKEN_ANSWER_LIMIT))
    except (RetryableStatus, httpx.TransportError) as exc:
        raise unreachable("Rupa", settings.base_url, "RUPA_BASE_URL", exc) or ApiError(
            f"Rupa token endpoint failed: {describe_transport_error(exc)}") from None
    return response


def request_tokens(http: httpx.Client, settings: RupaSettings, retry: RetrySettings, grant: dict) -> Tokens:
    """Trade a grant for tokens at Rupa's token endpoint and read the token response."""
    response = post_grant(http, settings, retry, grant)
    access, body = access_token_from(response)
    if response.status_code >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        if error == "invalid_client" or response.status_code == 401:
            raise AuthError("Rupa refused the client credentials: check RUPA_CLIENT_ID and "
                            "RUPA_CLIENT_SECRET", status=response.status_code)
        if error == "invalid_grant":
            if grant.get("grant_type") == "refresh_token":
                raise AuthError(REAUTHORIZE, status=response.status_code)
            raise AuthError("Rupa refused the authorization code (expired, already used, or a "
                            "different redirect URI); run `labsync rupa authorize` again",
                            status=response.status_code)
        shown = error if isinstance(error, str) and error.isidentifier() and len(error) <= 40 else None
        raise ApiError(f"Rupa token endpoint answered HTTP {response.status_code}"
                       + (f" ({shown})" if shown else ""), status=response.status_code)
    if access is None:  # never `Bearer None`, never a token that would break the header
        raise ApiError("Rupa token endpoint answered without a usable access token")
    now = datetime.now(UTC)
    expires_at = None
    try:
        if body.get("expires_in") is not None:
            expires_at = now + timedelta(seconds=float(body["expires_in"]))
    except (TypeError, ValueError):
        expires_at = None
    refresh = body.get("refresh_token") if isinstance(body.get("refresh_token"), str) else None
    return Tokens(access, refresh, expires_at, now)


class OAuthTokens:
    """Access tokens from the warehouse, refreshed before expiry and once after a 401."""

    def __init__(self, settings: RupaSettings, retry: RetrySettings, store: TokenStore,
                 http: httpx.Client) -> None:
        self.settings, self.retry, self.store, self.http = settings, retry, store, http
        self._tokens: Tokens | None = None
        self._lock = threading.Lock()
        self.refreshes = 0

    def token(self) -> str:
        with self._lock:
            if self._tokens is None:
                self._tokens = self.store.load()
                if self._tokens is None:
                    raise AuthError(NOT_AUTHORIZED)
            if self._tokens.needs_refresh():
                self._refresh(self._tokens.access_token)
            return self._tokens.access_token

    def after_401(self, used: str) -> str:
        with self._lock:
            self._refresh(used, rejected=True)
            return self._tokens.access_token  # type: ignore[union-attr]

    def _refresh(self, stale: str, *, rejected: bool = False) -> None:
        """Refresh unless another process already did (its token is then newer than `stale`)."""
        with self.store.locked() as (conn, current):
            if current is None:
                raise AuthError(NOT_AUTHORIZED)
            if current.access_token != stale and not current.needs_refresh():
                self._tokens = current
                log.info("using the Rupa access token refreshed by another run")
                return
            if not current.refresh_token:
                raise AuthError("the Rupa access token expired and there is no refresh token; "
                                "run `labsync rupa authorize` again")
            fresh = request_tokens(self.http, self.settings, self.retry,
                                   {"grant_type": "refresh_token", "refresh_token": current.refresh_token})
            if fresh.refresh_token is None:  # not rotated: keep the one we have
                fresh = replace(fresh, refresh_token=current.refresh_token)
            self.store.save(fresh, conn)  # committed before anyone uses the new tokens
        self._tokens = fresh
        self.refreshes += 1
        log.info("refreshed the Rupa access token%s", " after a 401" if rejected else " before expiry")


def token_source(settings: Settings, engine: Engine | None, http: httpx.Client) -> TokenSource:
    """`RUPA_API_TOKEN` when set, else OAuth tokens from the warehouse."""
    rupa = settings.rupa
    if rupa.api_token:
        return StaticToken(rupa.api_token)
    if engine is None:
        raise ConfigError("Rupa OAuth needs the warehouse to keep its tokens; set LABSYNC_WAREHOUSE_URL")
    return OAuthTokens(rupa, settings.retry, TokenStore.for_settings(engine, settings), http)


# ---- the one-time authorization ----------------------------------------------------------------
def new_state() -> str:
    return secrets.token_urlsafe(16)


def authorization_url(settings: RupaSettings, state: str) -> str:
    """The consent page a practitioner opens once in a browser."""
    query = urlencode({"client_id": settings.client_id or "", "redirect_uri": settings.redirect_uri,
                       "response_type": "code", "state": state})
    sep = "&" if "?" in settings.authorize_url else "?"
    return f"{settings.authorize_url}{sep}{query}"


def parse_authorization_response(text: str, expected_state: str | None = None) -> str:
    """The code from what the user pasted: the bare code or the whole redirected URL."""
    text = text.strip()
    if not text:
        raise AuthError("no authorization code given")
    if "://" not in text and "code=" not in text and "error=" not in text:
        return text
    parts = urlsplit(text)
    params = parse_qs(parts.query or (text if "://" not in text else ""))
    if "error" in params:
        raise AuthError(f"the authorization was not granted ({params['error'][0][:50]})")
    codes = params.get("code")
    if not codes:
        raise AuthError("the pasted URL has no `code` parameter; paste the whole URL you were redirected to")
    state = params.get("state", [None])[0]
    if expected_state is not None and state is not None and state != expected_state:
        raise AuthError("the pasted URL belongs to another authorization attempt (state mismatch)")
    return codes[0]


def exchange_code(engine: Engine, settings: Settings, code: str) -> Tokens:
    """Trade an authorization code for tokens and store them in `oauth_tokens` at once. The
    key for storing them is checked first: the code is single-use."""
    rupa = settings.rupa.validated()
    store = TokenStore.for_settings(engine, settings)
    with make_client(rupa.base_url, settings.retry, rupa.network) as http:
        tokens = request_tokens(http, rupa, settings.retry, {
            "grant_type": "authorization_code", "code": code, "redirect_uri": rupa.redirect_uri})
    store.save(tokens)
    log.debug("stored new Rupa tokens")  # the command that stores them says so
    return tokens
