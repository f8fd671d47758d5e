"""The shared HTTP plumbing: the one httpx client factory and the one retry policy.

Every vendor request goes through an httpx client made here (`make_client`, `make_async_client`),
on httpx's own transport: HTTP framing, interim 1xx answers, keep-alive and TLS are httpx's
business. Each client honours, per vendor connection (etl.settings.NetworkSettings), an explicit
proxy, a CA bundle, a client certificate (mTLS) and a timeout; without an explicit proxy the
standard HTTP_PROXY / HTTPS_PROXY / ALL_PROXY / NO_PROXY variables apply (httpx's trust_env).

Both vendor clients retry the same things the same way: 429, 500, 502, 503, 504, timeouts and
broken connections, with exponential backoff and full jitter, honouring `Retry-After` when the
server sends one, up to `RetrySettings.max_attempts`. Everything else is the caller's to handle.

A caller may cap what it honours (`max_retry_after`, e.g. LGC_MAX_RETRY_AFTER): an answer asking
for a longer wait raises `RetryAfterTooLong` at once instead of sleeping, so a row fails now with
a true reason rather than holding a batch for hours. Without a cap, waits are clipped at
`MAX_RETRY_AFTER`. A caller may also hand in its own `sleep` (e.g. one a circuit breaker can cut
short).

Usage (sync or async)::

    for attempt in retrying(settings.retry):
        with attempt:
            response = raise_for_retryable(client.get(url))

`attempt.retry_state.attempt_number` tells how many tries were made.
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import ipaddress
import logging
import socket
import ssl
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import httpcore
import httpx
import tenacity
from tenacity import wait_random_exponential

from etl import __version__
from etl.errors import AddressRefused, OverCap, Refused, RetryableStatus, RetryAfterTooLong
from etl.settings import BEARER_TOKEN_RE, NetworkSettings, RetrySettings, is_loopback_host

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 300.0  # never sleep longer than this on a server's say-so
USER_AGENT = f"labsync/{__version__}"


def raise_for_retryable(response: httpx.Response, *, max_retry_after: float | None = None) -> httpx.Response:
    """Return the response unless its status is one the retry policy retries. With
    `max_retry_after`, a Retry-After longer than that raises RetryAfterTooLong (not retried)."""
    if response.status_code in RETRYABLE_STATUSES:
        if max_retry_after is not None:
            asked = parse_retry_after(response.headers.get("Retry-After"))
            if asked is not None and asked > max_retry_after:
                raise RetryAfterTooLong(response, asked, max_retry_after)
        raise RetryableStatus(response)
    return response


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, RetryAfterTooLong):
        return False
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

    def __init__(self, initial: float, maximum: float, cap: float = MAX_RETRY_AFTER) -> None:
        self.backoff = wait_random_exponential(multiplier=initial, max=maximum)
        self.cap = cap

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, RetryableStatus):
            asked = parse_retry_after(exc.response.headers.get("Retry-After"))
            if asked is not None:
                return min(asked, self.cap)
        return self.backoff(retry_state)


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, RetryableStatus):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, httpx.ConnectError):
        return _connect_reason(exc)
    return type(exc).__name__ if exc else "unknown"


def _log_retry(retry_state: tenacity.RetryCallState) -> None:
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    wait = retry_state.next_action.sleep if retry_state.next_action else 0
    log.info("retrying after %s (attempt %d, waiting %.2fs)", _describe(exc), retry_state.attempt_number, wait)


def retry_kwargs(
    settings: RetrySettings, *, sleep: Callable | None = None, max_retry_after: float | None = None,
    retry_on: Callable[[BaseException], bool] = is_retryable,
) -> dict:
    """The policy as tenacity arguments. `max_retry_after`: the caller's cap on Retry-After (pass
    the same cap to `raise_for_retryable` so longer asks fail at once); `sleep`: the caller's
    sleep (sync or async to match the Retrying); `retry_on`: which errors are retried (a
    request that is not idempotent retries only what surely never reached the server)."""
    cap = MAX_RETRY_AFTER if max_retry_after is None else max_retry_after
    kwargs = dict(
        stop=tenacity.stop_after_attempt(settings.max_attempts),
        wait=wait_retry_after_or_backoff(settings.initial_wait, settings.max_wait, cap),
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


@functools.lru_cache(maxsize=16)
def _ssl_context(ca_bundle: str | None, client_cert: str | None, client_key: str | None) -> ssl.SSLContext:
    from etl.errors import ConfigError

    try:
        ctx = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else httpx.create_ssl_context()
    except (OSError, ssl.SSLError):
        raise ConfigError(f"the CA bundle {ca_bundle!r} could not be read as PEM certificates") from None
    if client_cert:
        try:
            ctx.load_cert_chain(client_cert, client_key)
        except (OSError, ssl.SSLError):
            raise ConfigError(f"the client certificate {client_cert!r} (and its key) could not be "
                              "loaded: a PEM certificate and its private key are needed") from None
    return ctx


def ssl_context(network: NetworkSettings | None = None) -> ssl.SSLContext:
    """The TLS context for a connection: its CA bundle (else the system's) and client
    certificate. Built once per distinct setting (loading a CA bundle costs milliseconds)."""
    network = network or NetworkSettings()
    return _ssl_context(network.ca_bundle, network.client_cert, network.client_key)


def client_options(retry: RetrySettings, network: NetworkSettings | None = None, *, concurrency: int = 4,
                   **kw: Any) -> dict[str, Any]:
    """The arguments of every labsync httpx client. `transport` in `kw` replaces the network
    (tests' stand-ins); otherwise httpx builds its own transport, through the proxy that applies."""
    network = network or NetworkSettings()
    options: dict[str, Any] = {
        "timeout": network.timeout or retry.timeout,
        "limits": _limits(concurrency),
        "trust_env": True,  # HTTP(S)_PROXY / ALL_PROXY / NO_PROXY, as every client should
        **kw,
        "headers": {"User-Agent": USER_AGENT, **kw.get("headers", {})},
    }
    if kw.get("transport") is None:
        options.pop("transport", None)
        options.setdefault("verify", ssl_context(network))
        if network.proxy:
            options["proxy"] = network.proxy
    return options


def make_client(base_url: str, settings: RetrySettings, network: NetworkSettings | None = None, *,
                concurrency: int = 4, **kw: Any) -> httpx.Client:
    """The one sync client factory (Rupa's API, result downloads)."""
    return httpx.Client(base_url=base_url, **client_options(settings, network, concurrency=concurrency, **kw))


def make_async_client(base_url: str, settings: RetrySettings, network: NetworkSettings | None = None, *,
                      concurrency: int = 8, **kw: Any) -> httpx.AsyncClient:
    """The one async client factory (LetsGetChecked: tokens, PUTs, GETs)."""
    return httpx.AsyncClient(base_url=base_url, **client_options(settings, network, concurrency=concurrency, **kw))


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _connect_reason(exc: BaseException) -> str:
    """`connection refused`, `host not found`, ...: plain words for why a connection failed, from
    the OS error under httpx's (the async transport says only "All connection attempts failed")."""
    import errno
    import socket
    import ssl

    if isinstance(exc, httpx.ConnectTimeout):
        return "no answer to connect (timed out)"
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return "its TLS certificate is not trusted"
        if isinstance(cause, ssl.SSLError):
            return "the TLS handshake failed"
        if isinstance(cause, socket.gaierror):
            return "host not found"
        if isinstance(cause, ConnectionRefusedError) or getattr(cause, "errno", None) == errno.ECONNREFUSED:
            return "connection refused"
        if getattr(cause, "errno", None) in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return "network unreachable"
    text = " ".join(str(c).lower() for c in _causes(exc))
    for words, reason in (("refused", "connection refused"), ("name or service not known", "host not found"),
                          ("nodename nor servname", "host not found"), ("name resolution", "host not found"),
                          ("certificate", "its TLS certificate is not trusted")):
        if words in text:
            return reason
    return "the connection failed"


def unreachable(vendor: str, base_url: str, setting: str, exc: BaseException):
    """An `Unreachable` (exit 2) when `exc` says nothing could be connected to at all, else None:
    "could not reach LetsGetChecked at http://127.0.0.1:1/lgc: connection refused (LGC_BASE_URL)".
    Only the configured base URL is named, never a request's path (ids) or query."""
    from etl.errors import Unreachable

    if not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return None
    return Unreachable(f"could not reach {vendor} at {base_url}: {_connect_reason(exc)} ({setting})")


def describe_transport_error(exc: BaseException) -> str:
    """A short, PHI-free description of why a request did not complete."""
    if isinstance(exc, RetryAfterTooLong):
        return (f"HTTP {exc.response.status_code} asking to wait {exc.asked:.0f}s (Retry-After), "
                f"longer than the {exc.cap:g}s cap")
    if isinstance(exc, RetryableStatus):
        return f"HTTP {exc.response.status_code} after retries"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return _connect_reason(exc)
    if isinstance(exc, httpx.TransportError):
        return f"connection problem ({type(exc).__name__})"
    return type(exc).__name__


# ---- answers read under a size cap ---------------------------------------------------------------
# A vendor (or a proxy in front of it) may answer with anything, of any size. Bodies are read as
# a stream and counted as they arrive (after content decoding, so a compressed bomb counts at
# its real size); past the cap reading stops and the connection is dropped, so a 200 MB answer
# never sits in memory. Requests ask for an uncompressed answer, which keeps the overshoot of one
# network read small. `labsync.over_cap` in a capped response's extensions says it was cut.
OVER_CAP = "labsync.over_cap"
NO_COMPRESSION = {"Accept-Encoding": "identity"}
_DROPPED_RAW_HEADERS = frozenset({b"content-encoding", b"content-length", b"transfer-encoding"})


def capped_response(status: int, headers: list[tuple[bytes, bytes]], request: httpx.Request, body: bytes,
                    over: bool, extensions: dict) -> httpx.Response:
    """The complete answer `aread_capped` returns, from its parts."""
    kept = [(k, v) for k, v in headers if k.lower() not in _DROPPED_RAW_HEADERS]
    return httpx.Response(status, headers=kept, content=body, request=request,
                          extensions={**extensions, OVER_CAP: over})


def unread_verdict(status: int, content_length: bytes | str | None, limit: int) -> bool | None:
    """When the status or the declared size settle an answer without reading its body: False
    (a retryable status: retried, its body never read), True (declared larger than `limit`:
    over the cap), else None (read it)."""
    if status in RETRYABLE_STATUSES:
        return False
    try:
        return True if int(content_length or 0) > limit else None
    except ValueError:
        return None


def _capped(response: httpx.Response, request: httpx.Request, body: bytes, over: bool) -> httpx.Response:
    return capped_response(response.status_code, response.headers.raw, request, body, over, response.extensions)


def _unread(response: httpx.Response, request: httpx.Request, limit: int) -> httpx.Response | None:
    """The answer without reading its body, when the status or the declared size settle it."""
    over = unread_verdict(response.status_code, response.headers.get("content-length"), limit)
    return None if over is None else _capped(response, request, b"", over)


class CappedBody:
    """Collects chunks until `limit`; `add` says False once the body is over it."""

    def __init__(self, limit: int) -> None:
        self.limit, self.size = limit, 0
        self.chunks: list[bytes] = []

    def add(self, chunk: bytes) -> bool:
        self.size += len(chunk)
        self.chunks.append(chunk)
        return self.size <= self.limit

    def response(self, response: httpx.Response, request: httpx.Request) -> httpx.Response:
        over = self.size > self.limit
        return _capped(response, request, b"" if over else b"".join(self.chunks), over)


async def aread_capped(response: httpx.Response, request: httpx.Request, limit: int) -> httpx.Response:
    """A streamed response, read up to `limit` bytes and closed, as a complete response. A
    retryable status's body is not read at all (it is retried)."""
    try:
        if (done := _unread(response, request, limit)) is not None:
            return done
        body = CappedBody(limit)
        async for chunk in response.aiter_bytes():
            if not body.add(chunk):
                break
        return body.response(response, request)
    finally:
        await response.aclose()


def read_capped(response: httpx.Response, request: httpx.Request, limit: int) -> httpx.Response:
    """The sync twin of `aread_capped`."""
    try:
        if (done := _unread(response, request, limit)) is not None:
            return done
        body = CappedBody(limit)
        for chunk in response.iter_bytes():
            if not body.add(chunk):
                break
        return body.response(response, request)
    finally:
        response.close()


class _CappedStream(httpx.AsyncByteStream, httpx.SyncByteStream):
    """A response body stream that ends after `limit` bytes (the rest is never read)."""

    def __init__(self, stream: Any, limit: int) -> None:
        self._stream, self._limit = stream, limit

    def __iter__(self):
        size = 0
        for chunk in self._stream:
            size += len(chunk)
            yield chunk
            if size > self._limit:
                break

    async def __aiter__(self):
        size = 0
        async for chunk in self._stream:
            size += len(chunk)
            yield chunk
            if size > self._limit:
                break

    def close(self) -> None:
        self._stream.close()

    async def aclose(self) -> None:
        await self._stream.aclose()


def capped_stream(stream: Any, limit: int) -> Any:
    """`stream` (a response's `.stream`) cut after `limit` bytes: for an answer httpx reads
    itself, such as the 401 an auth flow retries after."""
    return _CappedStream(stream, limit)


def over_cap(response: httpx.Response) -> bool:
    return bool(response.extensions.get(OVER_CAP))


def send_capped(client: httpx.Client, request: httpx.Request, limit: int, **kw) -> httpx.Response:
    """Send through `client` (`kw`: send()'s options, e.g. auth) and read the answer under the cap."""
    return read_capped(client.send(request, stream=True, **kw), request, limit)


async def asend_capped(client: httpx.AsyncClient, request: httpx.Request, limit: int, **kw) -> httpx.Response:
    return await aread_capped(await client.send(request, stream=True, **kw), request, limit)


def access_token_from(response: httpx.Response) -> tuple[str | None, dict]:
    """(the usable access token of an OAuth token answer or None, the answer's JSON object).

    Usable means a non-empty string that can follow `Bearer ` in a header as it is (RFC 6750's
    b64token): a null, a number, or a token with spaces or line breaks would otherwise go out as
    `Bearer None` or break the header."""
    if over_cap(response):
        return None, {}
    try:
        body = response.json()
    except ValueError:
        return None, {}
    if not isinstance(body, dict):
        return None, {}
    token = body.get("access_token")
    if not isinstance(token, str) or not BEARER_TOKEN_RE.match(token):
        return None, body
    return token, body


TOKEN_ANSWER_LIMIT = 64 << 10  # a token answer is a few hundred bytes


# ---- links from outside: fetched only from the vendor's own origins ------------------------------
# A link that arrives in a webhook (a Rupa result file) names a URL someone else wrote. Such a link
# is fetched only
# - from an origin on an allow-list (`OriginPolicy`: the configured API's own origin and the ones
#   a setting adds), over https; plain http only to loopback while the configured API is itself on
#   loopback (the local sandbox);
# - one redirect at a time, each hop checked against the same list (the caller follows them);
# - over a connection to an address checked when it is opened (`CheckedAddressBackend`): a name
#   that resolves to a loopback, private, link-local (cloud metadata) or otherwise internal
#   address is refused unless it is the configured API's own host. The name is resolved once and
#   the connection made to the very address that was checked, so a name cannot resolve to a
#   public address for the check and to an internal one for the connection (DNS rebinding);
# - read into a temporary file, the bytes on the wire and the decoded bytes both under a cap
#   (`download_to_file`; gzip/deflate decoded here, a piece at a time, so a compressed bomb stops
#   at the cap without ever being inflated in memory).
# Refusals (`Refused`) name at most the origin, never a path or query (signed, maybe PHI). Through
# a proxy (the vendor's proxy setting, or HTTP(S)_PROXY/NO_PROXY as Python's urllib reads them)
# the proxy resolves and connects: the address check is then the proxy's, the rest still holds.
Origin = tuple[str, str, int]  # scheme, host (ASCII, lower case; IPv6 without brackets), port
DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_REDIRECTS = 5
_PIECE = 64 << 10
_INTERNAL_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/3",
    "::/128", "::1/128", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def url_origin(url: str | httpx.URL) -> Origin | None:
    """(scheme, host, port) of an http(s) URL, the port filled in; None for anything else."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        host = parsed.raw_host.decode("ascii").lower()
    except (httpx.InvalidURL, TypeError, UnicodeError):
        return None
    if parsed.scheme not in DEFAULT_PORTS or not host:
        return None
    return parsed.scheme, host, parsed.port or DEFAULT_PORTS[parsed.scheme]


def origin_text(origin: Origin) -> str:
    """`https://files.example.com`, `http://127.0.0.1:8765`: an origin as people write it."""
    scheme, host, port = origin
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" if port == DEFAULT_PORTS.get(scheme) else f"{scheme}://{host}:{port}"



def is_internal_address(address: str) -> bool:
    """True for an address a link from outside must not reach: loopback, private (RFC 1918,
    fc00::/7), link-local (169.254/16, fe80::/10: where cloud metadata services answer, e.g.
    169.254.169.254, fd00:ec2::254), shared (100.64/10), multicast, unspecified, reserved, and an
    IPv6 address carrying any of those IPv4 ones (mapped, NAT64, 6to4, Teredo). Anything that is
    not an address at all counts as internal."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None,
                    ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None]
        if any(e is not None and is_internal_address(str(e)) for e in embedded):
            return True
    return (not ip.is_global or ip.is_multicast
            or any(ip in net for net in _INTERNAL_NETWORKS if net.version == ip.version))


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, in the resolver's order (one look-up)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class CheckedAddressBackend(httpcore.SyncBackend):
    """httpcore's own network backend, with the address check: `connect_tcp` resolves the host
    once (`resolve`), refuses it (`AddressRefused`) when any of its addresses is internal
    (`is_internal_address`), and connects to those checked addresses, in order, itself. TLS still
    names the host (SNI and the certificate check): httpcore starts it on this stream with the
    request's host name. `trusted`: (host, port) pairs exempt from the check, the configured
    API's own (the local sandbox is on loopback)."""

    def __init__(self, trusted: Iterable[tuple[str, int]] = ()) -> None:
        self.trusted = frozenset((host.lower(), port) for host, port in trusted)

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        if (host.lower(), port) in self.trusted:
            return super().connect_tcp(host, port, timeout, local_address, socket_options)
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        internal = [a for a in addresses if is_internal_address(a)]
        if internal:
            raise AddressRefused(f"{host} resolves to {internal[0]}, a loopback, private, link-local or "
                                 "metadata address")
        failure: Exception = httpcore.ConnectError(f"{host} has no address")
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure


class _CheckedTransport(httpx.HTTPTransport):
    """httpx's own transport (HTTP/1.1, keep-alive, TLS, its exceptions), its connections opened
    by `backend`. httpx takes no network backend of its own, so the connection pool it builds is
    replaced by httpcore's, given the backend (nothing else differs)."""

    def __init__(self, backend: httpcore.NetworkBackend, *, verify: ssl.SSLContext, limits: httpx.Limits) -> None:
        super().__init__(verify=verify, limits=limits, trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=verify, max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry, network_backend=backend)


@dataclass(frozen=True)
class OriginPolicy:
    """Where links from outside may be fetched from. `home`: the configured API's origin (always
    allowed, exempt from the address check); `allowed`: it and the origins a setting adds;
    `setting`: the setting named in refusals."""

    allowed: frozenset[Origin]
    home: Origin | None
    setting: str

    @classmethod
    def of(cls, base_url: str, extra: Iterable[str] = (), *, setting: str) -> OriginPolicy:
        home = url_origin(base_url)
        origins = {o for o in (url_origin(u) for u in extra) if o is not None}
        return cls(frozenset(origins | ({home} if home else set())), home, setting)

    @property
    def trusted(self) -> set[tuple[str, int]]:
        return {(self.home[1], self.home[2])} if self.home else set()

    def check(self, url: str | httpx.URL) -> httpx.URL:
        """`url`, parsed, when it may be fetched; else `Refused` saying why (its origin at most)."""
        origin = url_origin(url)
        if origin is None:
            raise Refused("not an http(s) URL")
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        if parsed.userinfo:
            raise Refused(f"a link to {origin_text(origin)} with user credentials in it")
        if origin not in self.allowed:
            raise Refused(f"{origin_text(origin)} is not an allowed origin (the API's own or {self.setting})")
        if origin[0] != "https" and not (self.home and self.home[0] == "http" and is_loopback_host(self.home[1])
                                         and is_loopback_host(origin[1])):
            raise Refused(f"{origin_text(origin)} is plain http: only https (plain http only to the "
                          "local sandbox on loopback)")
        return parsed


def _environment_proxy(origin: Origin) -> str | None:
    """The HTTP(S)_PROXY / ALL_PROXY that applies to `origin` (NO_PROXY honoured), else None."""
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(origin[0]) or proxies.get("all")
    if not proxy:
        return None
    host = f"[{origin[1]}]" if ":" in origin[1] else origin[1]
    if urllib.request.proxy_bypass_environment(f"{host}:{origin[2]}", proxies):  # type: ignore[attr-defined]
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def make_checked_client(policy: OriginPolicy, retry: RetrySettings, network: NetworkSettings | None = None, *,
                        concurrency: int = 1) -> httpx.Client:
    """The sync client for links from outside (see above): redirects are not followed (the
    caller checks each hop with `policy.check`), connections are opened by a
    `CheckedAddressBackend` exempting `policy.home`; the vendor's proxy (or the environment's)
    serves the allowed origins it applies to."""
    options = client_options(retry, network, concurrency=concurrency, follow_redirects=False)
    verify, proxy, limits = options.pop("verify"), options.pop("proxy", None), options["limits"]
    options["trust_env"] = False  # the environment's proxies: below, per allowed origin
    mounts: dict[str, httpx.BaseTransport] = {}
    for origin in sorted(policy.allowed):
        via = proxy or _environment_proxy(origin)
        if via:
            mounts[origin_text(origin)] = httpx.HTTPTransport(proxy=via, verify=verify, limits=limits, trust_env=False)
    transport = _CheckedTransport(CheckedAddressBackend(policy.trusted), verify=verify, limits=limits)
    return httpx.Client(transport=transport, mounts=mounts, **options)


@dataclass
class Download:
    """An answer's body in an anonymous temporary file (gone once closed), decoded."""

    file: IO[bytes]
    size: int  # decoded bytes
    wire_size: int  # bytes as they came (after chunked framing, before content decoding)
    sha256: str
    content_type: str | None

    def read(self) -> bytes:
        self.file.seek(0)
        return self.file.read()

    def close(self) -> None:
        self.file.close()


def _inflater(encoding: str | None) -> Any:
    """A zlib decompressor for the answer's Content-Encoding (gzip; deflate, zlib-wrapped as
    RFC 9110 says), None for none; `Refused` for an encoding not decoded here."""
    codings = [c.strip().lower() for c in (encoding or "").split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return None
    if codings in (["gzip"], ["x-gzip"]):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if codings == ["deflate"]:
        return zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib-wrapped, or gzip under the wrong name
    raise Refused(f"answered in a content encoding labsync does not decode ({', '.join(codings)[:40]})")


def download_to_file(response: httpx.Response, limit: int) -> Download:
    """Read a streamed answer (`client.stream(...)` or `send(stream=True)`, sent with
    `Accept-Encoding: gzip, deflate` at most) into a temporary file. Both the bytes on the wire and
    the decoded bytes count against `limit`: past it `OverCap` (nothing kept); a declared
    Content-Length over it is refused before reading."""
    declared = (response.headers.get("content-length") or "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise OverCap("declared")
    inflater = _inflater(response.headers.get("content-encoding"))
    out = tempfile.TemporaryFile(prefix="labsync-")
    digest = hashlib.sha256()
    size = wire = 0

    def keep(piece: bytes) -> None:
        nonlocal size
        size += len(piece)
        if size > limit:
            raise OverCap("decoded")
        digest.update(piece)
        out.write(piece)

    try:
        for chunk in response.iter_raw():
            wire += len(chunk)
            if wire > limit:
                raise OverCap("on the wire")
            if inflater is None:
                keep(chunk)
                continue
            data = chunk
            while True:
                try:
                    piece = inflater.decompress(data, _PIECE)
                except zlib.error:
                    raise httpx.DecodingError("the answer's compressed body is corrupt") from None
                keep(piece)
                data = inflater.unconsumed_tail
                if not data and len(piece) < _PIECE:
                    break
        if inflater is not None:
            keep(inflater.flush())
            if not inflater.eof:
                raise httpx.DecodingError("the answer's compressed body ends early")
        out.seek(0)
        return Download(out, size, wire, digest.hexdigest(), response.headers.get("content-type"))
    except BaseException:
        out.close()
        raise
