"""One settings object for the CLI (environment variables) and the DAGs (Airflow Connections,
read by etl.airflow).

Everything that talks to a vendor or the warehouse takes a `Settings` (or one of its parts) as an
argument; nothing else in `etl/` reads the environment.

Defaults are the embedded ones: the local sandbox APIs on 127.0.0.1 and a SQLite file under
`./.labsync/`. Credentials default to the sandbox's demo credentials *only* while the base URL
points at a loopback address, so a real endpoint never receives made-up keys.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from etl.errors import ConfigError

SANDBOX_HOST = "127.0.0.1"
SANDBOX_PORT = 8765
SANDBOX_URL = f"http://{SANDBOX_HOST}:{SANDBOX_PORT}"

# The local sandbox's demo credentials (not secrets: the sandbox is a test double).
SANDBOX_LGC_CLIENT_ID = "DEMO"
SANDBOX_LGC_ACCESS_KEY = "sandboxaccesskey000000001"
SANDBOX_LGC_SECRET_KEY = "sandboxsecretkey000000001"
SANDBOX_RUPA_CLIENT_ID = "sandbox-client"
SANDBOX_RUPA_CLIENT_SECRET = "sandbox-secret"

RUPA_AUTHORIZE_URL = "https://labs.rupahealth.com/oauth/authorize"

_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9]{1,4}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9]{25}$")
# RFC 6750's b64token: what may follow "Bearer " in a header without breaking or bending it.
BEARER_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")
_URL_PATH_RE = re.compile(r"^(?:/[A-Za-z0-9._~-]*)*$")
MiB = 1 << 20
DAY = 86_400.0  # seconds


# ---- numbers: every numeric setting, declared once with its range ------------------------------
# name -> (kind, lowest, highest, lowest excluded, the sentence when out of range). Both readers
# (the environment here, Airflow through etl.airflow) and every `validated()` check through
# `check_number`, so `nan`, `inf`, a negative timeout or zero attempts fail the same way: a
# ConfigError (exit 2) naming the setting.
NUMBERS: dict[str, tuple[type, float | None, float | None, bool, str]] = {
    "LABSYNC_SANDBOX_PORT": (int, 1, 65535, False, "must be a port number (1-65535)"),
    "LABSYNC_INBOX_SETTLE_SECONDS": (float, 0, DAY, False, "must be between 0 and 86400 seconds"),
    "LABSYNC_CHUNK_ROWS": (int, 1, 10_000_000, False, "must be between 1 and 10000000"),
    "LABSYNC_LEASE_SECONDS": (float, 0, DAY, True, "must be above 0 and at most 86400 seconds"),
    "LABSYNC_HEARTBEAT_SECONDS": (float, 0, DAY, True, "must be above 0 and at most 86400 seconds"),
    "LABSYNC_MAX_ATTEMPTS": (int, 1, 1000, False, "must be between 1 and 1000"),
    "LGC_CONCURRENCY": (int, 1, 1000, False, "must be at least 1 (and at most 1000)"),
    "LGC_RATE_LIMIT": (float, 0, 100_000, False, "must be 0 (unlimited) or a positive number (at most 100000)"),
    "LGC_MAX_RETRY_AFTER": (float, 0, DAY, False, "must be 0 or a positive number of seconds (at most 86400)"),
    "LGC_BREAKER_FAILURES": (int, 0, 1_000_000, False, "must be 0 (off) or a positive whole number"),
    "LGC_LOAD_DEADLINE": (float, 0, 7 * DAY, False, "must be 0 (none) or a positive number of seconds (at most a week)"),
    "LGC_MAX_RESPONSE_BYTES": (int, 1024, 1 << 30, False, "must be between 1024 and 1 GiB"),
    "LGC_TIMEOUT": (float, 0, 3600, True, "must be above 0 and at most 3600 seconds"),
    "RUPA_PAGE_SIZE": (int, 1, 1000, False, "must be between 1 and 1000"),
    "RUPA_MAX_PAGES": (int, 1, 100_000_000, False, "must be at least 1"),
    "RUPA_MAX_RESPONSE_BYTES": (int, 1024, 1 << 30, False, "must be between 1024 and 1 GiB"),
    "RUPA_CONCURRENCY": (int, 1, 64, False, "must be between 1 and 64"),
    "RUPA_TIMEOUT": (float, 0, 3600, True, "must be above 0 and at most 3600 seconds"),
    "LABSYNC_RETRY_ATTEMPTS": (int, 1, 100, False, "must be between 1 and 100"),
    "LABSYNC_RETRY_INITIAL_WAIT": (float, 0, 3600, False, "must be between 0 and 3600 seconds"),
    "LABSYNC_RETRY_MAX_WAIT": (float, 0, 3600, False, "must be between 0 and 3600 seconds"),
    "LABSYNC_HTTP_TIMEOUT": (float, 0, 3600, True, "must be above 0 and at most 3600 seconds"),
    "LABSYNC_WEBHOOK_PORT": (int, 1, 65535, False, "must be a port number (1-65535)"),
    "LABSYNC_WEBHOOK_MAX_BYTES": (int, 1024, 1 << 30, False, "must be between 1024 and 1 GiB"),
    "LABSYNC_WEBHOOK_BODY_TIMEOUT": (float, 0, 3600, True, "must be above 0 and at most 3600 seconds"),
    "LABSYNC_WEBHOOK_HEAD_TIMEOUT": (float, 0, 3600, True, "must be above 0 and at most 3600 seconds"),
    "LABSYNC_WEBHOOK_MAX_CONNECTIONS": (int, 1, 100_000, False, "must be between 1 and 100000"),
    "LABSYNC_TRACK_STALE_MINUTES": (float, 0, 525_600, False, "must be between 0 and 525600 minutes (a year)"),
    "LABSYNC_WEBHOOK_MAX_ATTEMPTS": (int, 1, 1000, False, "must be between 1 and 1000"),
    # read by the DAG files only (etl.settings.DagSettings)
    "LABSYNC_TASK_TIMEOUT_MINUTES": (float, 0, 10_080, True, "must be above 0 and at most 10080 minutes (a week)"),
    "LABSYNC_LOAD_TIMEOUT_MINUTES": (float, 0, 10_080, True, "must be above 0 and at most 10080 minutes (a week)"),
    "LABSYNC_LOAD_PARALLELISM": (int, 1, 1024, False, "must be between 1 and 1024"),
    # retention (etl.retention): days each data class is kept once nothing needs it any more
    **{f"LABSYNC_RETENTION_{c.upper()}_DAYS": (int, 0, 36_500, False, "must be between 0 and 36500 days")
       for c in ("webhook_bodies", "result_documents", "rejected_values", "outbox_bodies", "batch_files",
                 "audit")},
    # alerts (etl.alerts): the quiet period repeats fold into, and when waiting becomes a condition
    "LABSYNC_ALERT_QUIET_MINUTES": (float, 0, 525_600, False, "must be between 0 and 525600 minutes (a year)"),
    "LABSYNC_ALERT_WEBHOOK_MINUTES": (float, 0, 525_600, True, "must be above 0 and at most 525600 minutes (a year)"),
    "LABSYNC_ALERT_UNCHECKED_MINUTES": (float, 0, 525_600, True, "must be above 0 and at most 525600 minutes (a year)"),
    # read by the DAG files: a run still going this long after it was queued fires an alert (0 = none)
    "LABSYNC_RUN_DEADLINE_MINUTES": (float, 0, 10_080, False, "must be 0 (none) or at most 10080 minutes (a week)"),
}


def check_number(name: str, value: float) -> float:
    """`value` if it is a finite number inside `name`'s declared range, else ConfigError."""
    kind, low, high, low_open, rule = NUMBERS[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if kind is int and value != int(value):
        raise ConfigError(f"{name} must be a number (a whole one), got {value!r}")
    if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
        raise ConfigError(f"{name} {rule}")
    return value


def parse_number(name: str, raw: str) -> float:
    """A setting's text as its declared kind, checked (ConfigError naming it otherwise)."""
    kind = NUMBERS[name][0]
    try:
        value = kind(raw)
    except ValueError:
        if kind is int:
            raise ConfigError(f"{name} must be a number (a whole one), got {raw!r}") from None
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    return check_number(name, value)


def check_base_url(name: str, url: str) -> None:
    """A vendor base URL that every request path can be appended to and read back unchanged:
    http(s), a host, a plain path without `.`/`..` segments, no query, fragment or user info.
    Plain http only for a loopback address (the local sandbox): credentials, tokens and PHI never
    travel in clear."""
    parts = urlsplit(url)
    segments = parts.path.split("/")[1:]
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment
            or "@" in parts.netloc or "#" in url or "?" in url or not _URL_PATH_RE.match(parts.path)
            or any(seg in (".", "..") for seg in segments)):
        raise ConfigError(f"{name} must be an http(s) URL with a plain path and no query or "
                          "fragment, e.g. https://api.example.com/v1")
    if parts.scheme == "http" and not _is_loopback(url):
        raise ConfigError(f"{name} must be an https URL: plain http is allowed only for a loopback "
                          "address (the local sandbox), so credentials, tokens and PHI never travel in clear")


def check_api_token(name: str, token: str | None) -> None:
    if token is not None and not BEARER_TOKEN_RE.match(token):
        raise ConfigError(f"{name} is not a bearer token (letters, digits and - . _ ~ + / only)")


def is_loopback_host(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1): only this machine. A name that merely
    starts with `127.` (127.example.com) is not."""
    import ipaddress

    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_loopback(url: str) -> bool:
    return is_loopback_host(urlsplit(url).hostname or "")


@dataclass(frozen=True)
class RetrySettings:
    """The one retry policy (see etl.http): exponential backoff with jitter, Retry-After honoured."""

    max_attempts: int = 6
    initial_wait: float = 0.5
    max_wait: float = 30.0
    timeout: float = 30.0

    def validated(self) -> RetrySettings:
        check_number("LABSYNC_RETRY_ATTEMPTS", self.max_attempts)
        check_number("LABSYNC_RETRY_INITIAL_WAIT", self.initial_wait)
        check_number("LABSYNC_RETRY_MAX_WAIT", self.max_wait)
        check_number("LABSYNC_HTTP_TIMEOUT", self.timeout)
        return self


@dataclass(frozen=True)
class NetworkSettings:
    """How one vendor connection reaches the network (etl.http builds every client from it).

    proxy:       an http(s):// or socks5:// proxy URL for this vendor. Unset: the standard
                 HTTP_PROXY / HTTPS_PROXY / ALL_PROXY / NO_PROXY environment variables apply
                 (httpx's trust_env), as for any well-behaved client.
    ca_bundle:   a PEM file of the CAs to trust (a TLS-inspecting proxy's, a private CA);
                 unset: the system's bundle (certifi).
    client_cert, client_key: a PEM client certificate (and its key, unless in the same file)
                 presented to a server that asks for one (mTLS).
    timeout:     seconds for connect/read/write/pool; unset: LABSYNC_HTTP_TIMEOUT.
    Environment: <VENDOR>_PROXY, _CA_BUNDLE, _CLIENT_CERT, _CLIENT_KEY, _TIMEOUT; Airflow
    Connection extras: proxy, ca_bundle (or verify), client_cert (or cert), client_key (or key),
    timeout (etl.airflow.hooks)."""

    proxy: str | None = None
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = field(default=None, repr=False)
    timeout: float | None = None

    def validated(self, prefix: str) -> NetworkSettings:
        if self.proxy is not None:
            parts = urlsplit(self.proxy)
            if parts.scheme not in ("http", "https", "socks5", "socks5h") or not parts.hostname:
                raise ConfigError(f"{prefix}_PROXY must be a proxy URL such as http://proxy.example:3128")
        for name, path in ((f"{prefix}_CA_BUNDLE", self.ca_bundle), (f"{prefix}_CLIENT_CERT", self.client_cert),
                           (f"{prefix}_CLIENT_KEY", self.client_key)):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{name} {path!r} is not a readable file")
        if self.client_key is not None and self.client_cert is None:
            raise ConfigError(f"{prefix}_CLIENT_KEY is set without {prefix}_CLIENT_CERT")
        if self.timeout is not None:
            check_number(f"{prefix}_TIMEOUT", self.timeout)
        return self


@dataclass(frozen=True)
class LgcSettings:
    base_url: str = f"{SANDBOX_URL}/lgc"
    client_id: str = ""
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    api_token: str | None = field(default=None, repr=False)
    # The vendor budget (etl.lgc.budget): both hold for the whole deployment, shared through the
    # warehouse by every loader at once, not per process.
    concurrency: int = 8  # requests in flight
    rate_limit: float = 50.0  # orders per second, 0 = unlimited
    # How a load gives up (etl.lgc.breaker): a longer Retry-After fails the row now; this many
    # failed attempts in a row (transport errors, 5xx) stop the batch; no request starts after
    # the deadline. 0 switches the breaker or the deadline off.
    max_retry_after: float = 60.0  # seconds
    breaker_failures: int = 10
    load_deadline: float = 900.0  # seconds per load (one CLI file, one DAG load task)
    max_response_bytes: int = 1 * MiB  # a PUT's answer is a small order; more is not read
    network: NetworkSettings = field(default_factory=NetworkSettings)

    def validated(self) -> LgcSettings:
        """Fill the sandbox defaults where allowed and check the documented formats."""
        check_base_url("LGC_BASE_URL", self.base_url)
        check_api_token("LGC_API_TOKEN", self.api_token)
        s = self
        if _is_loopback(s.base_url):
            s = replace(
                s,
                client_id=s.client_id or SANDBOX_LGC_CLIENT_ID,
                access_key=s.access_key if (s.access_key or s.api_token) else SANDBOX_LGC_ACCESS_KEY,
                secret_key=s.secret_key if (s.secret_key or s.api_token) else SANDBOX_LGC_SECRET_KEY,
            )
        if not _CLIENT_ID_RE.match(s.client_id or ""):
            raise ConfigError(
                "LGC_CLIENT_ID must be 1 to 4 letters or digits (the clientId LetsGetChecked gave you)"
            )
        if not s.api_token:
            if not (s.access_key and s.secret_key):
                raise ConfigError(
                    "LetsGetChecked credentials missing: set LGC_ACCESS_KEY and LGC_SECRET_KEY, "
                    "or LGC_API_TOKEN"
                )
            for name, value in (("LGC_ACCESS_KEY", s.access_key), ("LGC_SECRET_KEY", s.secret_key)):
                if not _KEY_RE.match(value):
                    raise ConfigError(f"{name} must be 25 letters or digits")
        numbers: tuple[tuple[str, float], ...] = (("LGC_CONCURRENCY", s.concurrency), ("LGC_RATE_LIMIT", s.rate_limit),
                            ("LGC_MAX_RETRY_AFTER", s.max_retry_after),
                            ("LGC_BREAKER_FAILURES", s.breaker_failures),
                            ("LGC_LOAD_DEADLINE", s.load_deadline),
                            ("LGC_MAX_RESPONSE_BYTES", s.max_response_bytes))
        for number, amount in numbers:
            check_number(number, amount)
        s.network.validated("LGC")
        return s


@dataclass(frozen=True)
class RupaSettings:
    base_url: str = f"{SANDBOX_URL}/rupa"
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    api_token: str | None = field(default=None, repr=False)
    redirect_uri: str = "http://127.0.0.1:8765/oauth/callback"
    authorize_url: str = RUPA_AUTHORIZE_URL
    page_size: int = 100
    max_pages: int = 10_000  # pages per stream per run: a server whose paging never ends is stopped
    max_response_bytes: int = 8 * MiB  # one page (or any answer); more is not read
    concurrency: int = 4  # order-intent rows sent at once (etl.checkout.intents)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    # RUPA_RESULT_ORIGINS: where result files may be downloaded from besides RUPA_BASE_URL's own
    # origin (etl.checkout.events), e.g. ("https://files.rupahealth.com",)
    result_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """RUPA_RESULT_ORIGINS, checked as soon as it is read: each an https origin (scheme, host,
        port; no path, query or user info), plain http only for a loopback address."""
        origins = self.result_origins
        if isinstance(origins, str) or not all(isinstance(o, str) for o in origins):
            raise ConfigError("RUPA_RESULT_ORIGINS must be a list of origins such as https://files.rupahealth.com")
        for origin in origins:
            parts = urlsplit(origin)
            try:
                ok = parts.port != 0  # urlsplit raises ValueError on a port that is not one
            except ValueError:
                ok = False
            if (not ok or not parts.hostname or parts.path not in ("", "/") or "?" in origin or "#" in origin
                    or "@" in parts.netloc
                    or not (parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(origin)))):
                raise ConfigError(f"RUPA_RESULT_ORIGINS: {origin!r} is not an https origin such as "
                                  "https://files.rupahealth.com (scheme and host, no path or query; plain "
                                  "http only for a loopback address)")

    def validated(self) -> RupaSettings:
        check_base_url("RUPA_BASE_URL", self.base_url)
        check_api_token("RUPA_API_TOKEN", self.api_token)
        s = self
        if _is_loopback(s.base_url):
            s = replace(
                s,
                client_id=s.client_id or SANDBOX_RUPA_CLIENT_ID,
                client_secret=s.client_secret or SANDBOX_RUPA_CLIENT_SECRET,
                authorize_url=s.authorize_url
                if s.authorize_url != RUPA_AUTHORIZE_URL
                else f"{s.base_url}/oauth/authorize",
            )
        if not s.api_token and not (s.client_id and s.client_secret):
            raise ConfigError(
                "Rupa credentials missing: set RUPA_CLIENT_ID and RUPA_CLIENT_SECRET, or RUPA_API_TOKEN"
            )
        for name, value in (("RUPA_CONCURRENCY", s.concurrency), ("RUPA_PAGE_SIZE", s.page_size),
                            ("RUPA_MAX_PAGES", s.max_pages), ("RUPA_MAX_RESPONSE_BYTES", s.max_response_bytes)):
            check_number(name, value)
        s.network.validated("RUPA")
        return s


MIN_PATH_SECRET = 32  # characters of a capability path (token_urlsafe(32) gives 43)


@dataclass(frozen=True)
class WebhookSettings:
    """The webhook receiver (`labsync webhooks serve`, etl.webhooks).

    LetsGetChecked signs optionally and publishes its scheme (`Authorization: LGC2-HMAC-SHA256
    <base64 HMAC-SHA256 of the raw body>`, keyed with the base64 key string's own ASCII bytes).
    Rupa names a signature step but publishes no scheme, so its verifier's header, algorithm,
    encoding and prefix are settings; verification is off while no secret is set. Several keys
    separated by commas are all accepted (for rotation)."""

    host: str = "127.0.0.1"
    port: int = 8900
    max_body: int = 1024 * 1024  # bytes; a larger delivery is refused with 413
    lgc_key: str | None = field(default=None, repr=False)
    rupa_secret: str | None = field(default=None, repr=False)
    rupa_header: str = "X-Rupa-Signature"
    rupa_algorithm: str = "sha256"
    rupa_encoding: str = "hex"  # hex | base64
    rupa_prefix: str = ""  # e.g. "sha256=" when the header carries one
    # a capability URL: Rupa's deliveries come to POST /webhooks/rupa/<this secret> (at least
    # MIN_PATH_SECRET characters of URL-safe random text); the bare /webhooks/rupa then answers 404
    rupa_path_secret: str | None = field(default=None, repr=False)
    # a receiver open to the network holds up (etl.webhooks.app, etl.asgi): a body that has not
    # arrived in `body_timeout` gets 408, headers that have not in `head_timeout` are dropped,
    # connections beyond `max_connections` get 503 (the vendors retry)
    body_timeout: float = 10.0
    head_timeout: float = 10.0
    max_connections: int = 100

    def validated(self) -> WebhookSettings:
        check_number("LABSYNC_WEBHOOK_PORT", self.port)
        check_number("LABSYNC_WEBHOOK_MAX_BYTES", self.max_body)
        check_number("LABSYNC_WEBHOOK_BODY_TIMEOUT", self.body_timeout)
        check_number("LABSYNC_WEBHOOK_HEAD_TIMEOUT", self.head_timeout)
        check_number("LABSYNC_WEBHOOK_MAX_CONNECTIONS", self.max_connections)
        if self.rupa_encoding not in ("hex", "base64"):
            raise ConfigError("RUPA_WEBHOOK_ENCODING must be hex or base64")
        if self.rupa_path_secret is not None:
            secret = self.rupa_path_secret
            if len(secret) < MIN_PATH_SECRET or not all(c.isascii() and (c.isalnum() or c in "-_") for c in secret):
                raise ConfigError(f"RUPA_WEBHOOK_PATH must be at least {MIN_PATH_SECRET} characters of "
                                  "letters, digits, - and _ (make one with: python -c \"import secrets; "
                                  "print(secrets.token_urlsafe(32))\")")
        import hashlib

        if self.rupa_algorithm not in hashlib.algorithms_guaranteed:
            raise ConfigError(f"RUPA_WEBHOOK_ALGORITHM {self.rupa_algorithm!r} is not a hash "
                              "algorithm Python knows (e.g. sha256, sha1, sha512)")
        return self


# LetsGetChecked does not publish the PATCH body that cancels an order item; this is the
# issue's reading of its `patchOperation` description. LGC_CANCEL_PATCH replaces it (JSON).
DEFAULT_CANCEL_PATCH = {"patchOperation": {"op": "replace", "path": "/status", "value": "Cancelled"}}


@dataclass(frozen=True)
class LifecycleSettings:
    """After the PUT (etl.orders.lifecycle, etl.orders.results): tracking, webhooks applied, cancels."""

    stale_after: float = 3600.0  # seconds: the sweep polls open orders not checked for this long
    max_event_attempts: int = 10  # a webhook event that failed this often is left alone
    cancel_patch: Mapping = field(default_factory=lambda: DEFAULT_CANCEL_PATCH)

    def validated(self) -> LifecycleSettings:
        check_number("LABSYNC_TRACK_STALE_MINUTES", self.stale_after / 60)
        check_number("LABSYNC_WEBHOOK_MAX_ATTEMPTS", self.max_event_attempts)
        if not isinstance(self.cancel_patch, Mapping) or not self.cancel_patch:
            raise ConfigError("LGC_CANCEL_PATCH must be a JSON object")
        return self


def _json_object(name: str, raw: str | None, default: Mapping) -> Mapping:
    if raw is None:
        return default
    try:
        value = json.loads(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a JSON object, e.g. {json.dumps(default)}") from None
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{name} must be a JSON object, e.g. {json.dumps(default)}")
    return value


@dataclass(frozen=True)
class RetentionSettings:
    """Days each class of PHI is kept once nothing needs it any more (etl.retention; `labsync
    purge` and the labsync_retention DAG apply it). LABSYNC_RETENTION_<CLASS>_DAYS, e.g.
    LABSYNC_RETENTION_WEBHOOK_BODIES_DAYS; 0 = purge as soon as it is no longer needed."""

    webhook_bodies: int = 30  # raw webhook bodies of applied (or, authenticated, ignored) events
    result_documents: int = 365  # result JSON / HL7 / PDF bytes and the values read from them
    rejected_values: int = 90  # rejected cells kept in the warehouse (the fix file has them)
    outbox_bodies: int = 30  # order bodies of settled outbox rows (normally dropped at once)
    batch_files: int = 90  # batch files and their reports in the inbox's processed/ and failed/
    audit: int = 2192  # the audit trail itself (6 years)

    CLASSES = ("webhook_bodies", "result_documents", "rejected_values", "outbox_bodies", "batch_files", "audit")

    def days(self, data_class: str) -> int:
        return int(getattr(self, data_class))

    def validated(self) -> RetentionSettings:
        for c in self.CLASSES:
            check_number(f"LABSYNC_RETENTION_{c.upper()}_DAYS", self.days(c))
        return self


@dataclass(frozen=True)
class AlertSettings:
    """Where alerts go and when a condition is one (etl.alerts). LABSYNC_ALERTS (or the Airflow
    Variable `labsync_alerts`): comma-separated Airflow connection ids, each an SMTP (`smtp`),
    Slack incoming-webhook (`slackwebhook`) or HTTP (`http`/`https`: a generic JSON webhook)
    connection, read as Airflow does (AIRFLOW_CONN_<ID> outside Airflow too)."""

    destinations: tuple[str, ...] = ()
    quiet_minutes: float = 240.0  # repeats of an open condition within this are folded into one
    webhook_minutes: float = 120.0  # webhook events unapplied this long are a condition
    unchecked_minutes: float = 360.0  # open orders not checked this long are a condition
    email_to: tuple[str, ...] = ()  # LABSYNC_ALERT_EMAIL_TO; else the SMTP connection's extra `to`
    airflow_url: str | None = None  # LABSYNC_AIRFLOW_URL: links to runs (else Airflow's api.base_url)

    def validated(self) -> AlertSettings:
        check_number("LABSYNC_ALERT_QUIET_MINUTES", self.quiet_minutes)
        check_number("LABSYNC_ALERT_WEBHOOK_MINUTES", self.webhook_minutes)
        check_number("LABSYNC_ALERT_UNCHECKED_MINUTES", self.unchecked_minutes)
        for conn_id in self.destinations:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,250}", conn_id):
                raise ConfigError("LABSYNC_ALERTS must be comma-separated Airflow connection ids "
                                  "(letters, digits, _ . -), e.g. smtp_alerts,slack_alerts")
        return self


def split_list(raw: str | None) -> tuple[str, ...]:
    """`a, b,,c` -> ("a", "b", "c")."""
    return tuple(p.strip() for p in (raw or "").split(",") if p.strip())


@dataclass(frozen=True)
class Settings:
    warehouse_url: str = "sqlite:///.labsync/labsync.db"
    # a local folder or an fsspec URL (s3://bucket/prefix, gs://…, sftp://…: etl.intake.storage), and the
    # Airflow Connection holding its credentials (else one named in the URL, else the environment)
    inbox: str | Path = Path("inbox")
    inbox_conn_id: str | None = None
    inbox_settle_seconds: float = 5.0  # a file younger than this may still be being copied in
    chunk_rows: int = 5_000  # rows per load task when the DAG spreads a batch over workers
    # claims in the warehouse (etl.claims): a lease renewed by a heartbeat while the work goes on;
    # a claim whose lease lapsed (its owner died) is taken over by anyone
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 15.0
    max_attempts: int = 5  # loads that may send one outbox row before it is given up (needs a person)
    lgc: LgcSettings = field(default_factory=LgcSettings)
    rupa: RupaSettings = field(default_factory=RupaSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)

    def checked(self) -> Settings:
        """Check the settings every command and task needs (the vendors' are checked by
        `LgcSettings.validated()` / `RupaSettings.validated()` where they are used)."""
        check_number("LABSYNC_CHUNK_ROWS", self.chunk_rows)
        check_number("LABSYNC_INBOX_SETTLE_SECONDS", self.inbox_settle_seconds)
        check_number("LABSYNC_LEASE_SECONDS", self.lease_seconds)
        check_number("LABSYNC_HEARTBEAT_SECONDS", self.heartbeat_seconds)
        self.retry.validated()
        if not 0 < self.heartbeat_seconds < self.lease_seconds:
            raise ConfigError(
                "LABSYNC_HEARTBEAT_SECONDS must be above 0 and below LABSYNC_LEASE_SECONDS "
                "(a lease must be renewed before it lapses)"
            )
        check_number("LABSYNC_MAX_ATTEMPTS", self.max_attempts)
        return self

    # Fernet key(s) for the tokens stored in the warehouse, "new,old" while rotating (etl.vault)
    fernet_key: str | None = field(default=None, repr=False)

    # ---- sources -------------------------------------------------------------------------
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read LABSYNC_*, LGC_* and RUPA_* environment variables (the CLI's source)."""
        env = os.environ if env is None else env
        d = cls()

        def get(name: str, default=None):
            value = env.get(name)
            return value.strip() if value and value.strip() else default

        def num(name: str, default, kind=float):  # kind: declared in NUMBERS
            raw = get(name)
            return default if raw is None else parse_number(name, raw)

        def network(prefix: str) -> NetworkSettings:
            timeout = get(f"{prefix}_TIMEOUT")
            return NetworkSettings(
                proxy=get(f"{prefix}_PROXY"), ca_bundle=get(f"{prefix}_CA_BUNDLE"),
                client_cert=get(f"{prefix}_CLIENT_CERT"), client_key=get(f"{prefix}_CLIENT_KEY"),
                timeout=None if timeout is None else parse_number(f"{prefix}_TIMEOUT", timeout))

        lease = num("LABSYNC_LEASE_SECONDS", d.lease_seconds)
        # the local sandbox's port, the one place to change it: `labsync sandbox` listens there
        # and the default base URLs and redirect URI point there
        sandbox = f"http://{SANDBOX_HOST}:{num('LABSYNC_SANDBOX_PORT', SANDBOX_PORT, int)}"
        return cls(
            warehouse_url=get("LABSYNC_WAREHOUSE_URL", d.warehouse_url),
            inbox=get("LABSYNC_INBOX", str(d.inbox)),  # kept a string: Path() would mangle s3://
            inbox_conn_id=get("LABSYNC_INBOX_CONN_ID"),
            inbox_settle_seconds=num("LABSYNC_INBOX_SETTLE_SECONDS", d.inbox_settle_seconds),
            chunk_rows=num("LABSYNC_CHUNK_ROWS", d.chunk_rows, int),
            lease_seconds=lease,
            heartbeat_seconds=num("LABSYNC_HEARTBEAT_SECONDS", lease / 4),
            max_attempts=num("LABSYNC_MAX_ATTEMPTS", d.max_attempts, int),
            lgc=LgcSettings(
                base_url=get("LGC_BASE_URL", f"{sandbox}/lgc").rstrip("/"),
                client_id=get("LGC_CLIENT_ID", ""),
                access_key=get("LGC_ACCESS_KEY"),
                secret_key=get("LGC_SECRET_KEY"),
                api_token=get("LGC_API_TOKEN"),
                concurrency=num("LGC_CONCURRENCY", d.lgc.concurrency, int),
                rate_limit=num("LGC_RATE_LIMIT", d.lgc.rate_limit),
                max_retry_after=num("LGC_MAX_RETRY_AFTER", d.lgc.max_retry_after),
                breaker_failures=num("LGC_BREAKER_FAILURES", d.lgc.breaker_failures, int),
                load_deadline=num("LGC_LOAD_DEADLINE", d.lgc.load_deadline),
                max_response_bytes=num("LGC_MAX_RESPONSE_BYTES", d.lgc.max_response_bytes, int),
                network=network("LGC"),
            ),
            rupa=RupaSettings(
                base_url=get("RUPA_BASE_URL", f"{sandbox}/rupa").rstrip("/"),
                client_id=get("RUPA_CLIENT_ID"),
                client_secret=get("RUPA_CLIENT_SECRET"),
                api_token=get("RUPA_API_TOKEN"),
                redirect_uri=get("RUPA_REDIRECT_URI", f"{sandbox}/oauth/callback"),
                authorize_url=get("RUPA_AUTHORIZE_URL", d.rupa.authorize_url),
                page_size=num("RUPA_PAGE_SIZE", d.rupa.page_size, int),
                max_pages=num("RUPA_MAX_PAGES", d.rupa.max_pages, int),
                max_response_bytes=num("RUPA_MAX_RESPONSE_BYTES", d.rupa.max_response_bytes, int),
                concurrency=num("RUPA_CONCURRENCY", d.rupa.concurrency, int),
                network=network("RUPA"),
                result_origins=tuple(o.strip().rstrip("/") for o in get("RUPA_RESULT_ORIGINS", "").split(",") if o.strip()),
            ),
            retry=RetrySettings(
                max_attempts=num("LABSYNC_RETRY_ATTEMPTS", d.retry.max_attempts, int),
                initial_wait=num("LABSYNC_RETRY_INITIAL_WAIT", d.retry.initial_wait),
                max_wait=num("LABSYNC_RETRY_MAX_WAIT", d.retry.max_wait),
                timeout=num("LABSYNC_HTTP_TIMEOUT", d.retry.timeout),
            ),
            webhooks=WebhookSettings(
                host=get("LABSYNC_WEBHOOK_HOST", d.webhooks.host),
                port=num("LABSYNC_WEBHOOK_PORT", d.webhooks.port, int),
                max_body=num("LABSYNC_WEBHOOK_MAX_BYTES", d.webhooks.max_body, int),
                body_timeout=num("LABSYNC_WEBHOOK_BODY_TIMEOUT", d.webhooks.body_timeout),
                head_timeout=num("LABSYNC_WEBHOOK_HEAD_TIMEOUT", d.webhooks.head_timeout),
                max_connections=num("LABSYNC_WEBHOOK_MAX_CONNECTIONS", d.webhooks.max_connections, int),
                lgc_key=get("LGC_WEBHOOK_KEY"),
                rupa_secret=get("RUPA_WEBHOOK_SECRET"),
                rupa_header=get("RUPA_WEBHOOK_HEADER", d.webhooks.rupa_header),
                rupa_algorithm=get("RUPA_WEBHOOK_ALGORITHM", d.webhooks.rupa_algorithm).lower(),
                rupa_encoding=get("RUPA_WEBHOOK_ENCODING", d.webhooks.rupa_encoding).lower(),
                rupa_prefix=get("RUPA_WEBHOOK_PREFIX", d.webhooks.rupa_prefix),
                rupa_path_secret=get("RUPA_WEBHOOK_PATH"),
            ),
            fernet_key=get("LABSYNC_FERNET_KEY"),
            lifecycle=LifecycleSettings(
                stale_after=60 * num("LABSYNC_TRACK_STALE_MINUTES", d.lifecycle.stale_after / 60),
                max_event_attempts=num("LABSYNC_WEBHOOK_MAX_ATTEMPTS", d.lifecycle.max_event_attempts, int),
                cancel_patch=_json_object("LGC_CANCEL_PATCH", get("LGC_CANCEL_PATCH"),
                                          d.lifecycle.cancel_patch),
            ),
            retention=RetentionSettings(**{
                c: num(f"LABSYNC_RETENTION_{c.upper()}_DAYS", d.retention.days(c), int)
                for c in RetentionSettings.CLASSES}),
            alerts=AlertSettings(
                destinations=split_list(get("LABSYNC_ALERTS")),
                quiet_minutes=num("LABSYNC_ALERT_QUIET_MINUTES", d.alerts.quiet_minutes),
                webhook_minutes=num("LABSYNC_ALERT_WEBHOOK_MINUTES", d.alerts.webhook_minutes),
                unchecked_minutes=num("LABSYNC_ALERT_UNCHECKED_MINUTES", d.alerts.unchecked_minutes),
                email_to=split_list(get("LABSYNC_ALERT_EMAIL_TO")),
                airflow_url=get("LABSYNC_AIRFLOW_URL"),
            ),
        )


@dataclass(frozen=True)
class DagSettings:
    """What the DAG files read when Airflow parses them (schedules, pools, timeouts, how many load
    tasks run at once). Declared here like every other setting, so `labsync doctor` checks them
    and a bad value fails the parse with a sentence naming the setting, not a traceback."""

    task_timeout_minutes: float = 60.0
    load_timeout_minutes: float = 30.0
    load_parallelism: int = 4
    lgc_pool: str = "lgc_api"
    inbox_schedule: str = "*/5 * * * *"
    lifecycle_schedule: str = "*/15 * * * *"
    rupa_schedule: str = "@hourly"
    rupa_checkout_schedule: str = "*/5 * * * *"
    retention_schedule: str = "@daily"
    run_deadline_minutes: float = 0.0  # a run not finished this long after it was queued alerts (0 = none)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DagSettings:
        env = os.environ if env is None else env
        d = cls()

        def get(name: str, default: str) -> str:
            value = (env.get(name) or "").strip()
            return value or default

        def num(name: str, default: float) -> float:
            raw = (env.get(name) or "").strip()
            return default if not raw else parse_number(name, raw)

        return cls(
            task_timeout_minutes=num("LABSYNC_TASK_TIMEOUT_MINUTES", d.task_timeout_minutes),
            load_timeout_minutes=num("LABSYNC_LOAD_TIMEOUT_MINUTES", d.load_timeout_minutes),
            load_parallelism=int(num("LABSYNC_LOAD_PARALLELISM", d.load_parallelism)),
            lgc_pool=get("LABSYNC_LGC_POOL", d.lgc_pool),
            inbox_schedule=get("LABSYNC_INBOX_SCHEDULE", d.inbox_schedule),
            lifecycle_schedule=get("LABSYNC_LIFECYCLE_SCHEDULE", d.lifecycle_schedule),
            rupa_schedule=get("LABSYNC_RUPA_SCHEDULE", d.rupa_schedule),
            rupa_checkout_schedule=get("LABSYNC_RUPA_CHECKOUT_SCHEDULE", d.rupa_checkout_schedule),
            retention_schedule=get("LABSYNC_RETENTION_SCHEDULE", d.retention_schedule),
            run_deadline_minutes=num("LABSYNC_RUN_DEADLINE_MINUTES", d.run_deadline_minutes),
        )
