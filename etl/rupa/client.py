"""The Rupa Health API client: JSON:API over httpx, paging by `links.next`, the shared retries.

Why it follows `links.next` verbatim: the client then never needs to know the server's paging
scheme (cursor, offset, numbers), and an interrupted extraction can resume from the stored URL
of the next page. Only the first request carries our page size (`page[size]`, as JSON:API
suggests). A `next` link pointing at another host is refused: it would receive our token.

Paging with a memory: `pages()` remembers every page URL of the run (normalised: scheme and host
case, percent-encoding, parameter order and fragments do not make a page new) and stops with
`RupaPageLoop` on any repeat, so a cycle over two or more pages ends at once. A run also has a
page budget (`RUPA_MAX_PAGES`): a server that mints new cursors forever ends in `RupaPageBudget`.

Ids in URLs (`/patients/{id}`) must be ids that travel unchanged (the rule of
schemas.columns.path_id_problem); any other is refused before anything is sent. Answers are read
as a stream under `RUPA_MAX_RESPONSE_BYTES`.

Errors: a JSON:API `errors` array becomes a `RupaApiError` whose message keeps only structured
parts of each error: status, `code` and `title` when they look like fixed strings, and the
source pointer or parameter when it is plainly a field name (etl.redact). Free text (`detail`)
is kept on the exception (`.errors`) but never in the message, because servers echo submitted
values (names, emails, tokens) there. 429/5xx/timeouts/broken connections go through
`etl.http.retrying`; a 401 gets one token refresh and one more try.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urljoin, urlsplit

import httpx
from sqlalchemy import Engine

from etl.errors import (
    ApiError,
    AuthError,
    RupaApiError,
    RupaPageBudget,
    RupaPageLoop,
    UnsafeIdError,
    size_text,
)
from etl.http import (
    NO_COMPRESSION,
    RetryableStatus,
    access_token_from,
    describe_transport_error,
    is_retryable,
    is_retryable_unsent,
    make_client,
    over_cap,
    raise_for_retryable,
    retrying,
    send_capped,
    unreachable,
)
from etl.redact import escape_controls, field_names, fixed_text
from etl.rupa.auth import RupaAuth, StaticToken, TokenSource, post_grant, token_source
from etl.settings import RetrySettings, RupaSettings, Settings
from schemas.columns import path_id_problem

log = logging.getLogger(__name__)

JSONAPI = "application/vnd.api+json"


# JSON:API's own member names and paging parameters: field names Rupa may blame.
JSONAPI_FIELDS = frozenset("data attributes relationships type id meta links included page size "
                           "after before number offset limit cursor filter sort include fields".split())


def page_key(url: str) -> tuple:
    """A URL as a page identity: scheme and host case, default ports, percent-encoding, the
    order of query parameters and the fragment do not make a page new."""
    p = urlsplit(url)
    port = p.port if p.port not in (None, 80 if p.scheme.lower() == "http" else 443) else None
    host = (p.hostname or "").lower()
    return (p.scheme.lower(), host, port, unquote(p.path).rstrip("/") or "/",
            tuple(sorted(parse_qsl(p.query, keep_blank_values=True))))


@dataclass(frozen=True)
class Page:
    """One page of a list endpoint: its resources, the URL it came from and the next page's."""

    url: str
    data: list[dict]
    next_url: str | None
    total: int | None = None  # meta.total when the server sends it (progress display only)


@dataclass(frozen=True)
class OrderIntent:
    id: str
    checkout_url: str
    resource: dict


def describe_errors(status: int, errors: Iterable[dict], sent: Iterable[str] = (),
                    known: Iterable[str] = ()) -> str:
    """`HTTP 422: Missing required attribute [missing_attribute] at /data/attributes/email; ...`
    from the structured parts only; `sent` are the values of the request (never echoed)."""
    sent = list(sent)
    fields = JSONAPI_FIELDS | set(known)
    parts = []
    for err in errors:
        if not isinstance(err, dict):
            continue
        title = fixed_text(err.get("title"), sent)
        code = fixed_text(err.get("code"), sent, max_len=60)
        text = title or code or "error"
        if code and title:
            text += f" [{code}]"
        found = err.get("source")
        source = found if isinstance(found, dict) else {}
        where, _ = field_names([source.get("pointer") or source.get("parameter")], sent, known=fields)
        if where:
            text += f" at {where[0]}"
        parts.append(text)
    return f"HTTP {status}: " + ("; ".join(parts[:5]) or "no details")


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _keys(value: object) -> set[str]:
    if isinstance(value, dict):
        return {str(k) for k in value} | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


class RupaClient:
    """Talks to one Rupa base URL with one token source. Use as a context manager."""

    def __init__(self, settings: RupaSettings, retry: RetrySettings, auth: TokenSource,
                 http: httpx.Client) -> None:
        self.settings, self.retry, self.auth, self.http = settings, retry, auth, http
        self._auth = RupaAuth(auth, settings.max_response_bytes)
        base = urlsplit(settings.base_url)
        self._origin = (base.scheme, base.netloc)
        self.requests = 0

    # ---- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RupaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _url(self, path_or_url: str) -> str:
        if "://" in path_or_url:
            return path_or_url
        return f"{self.settings.base_url.rstrip('/')}/{path_or_url.lstrip('/')}"

    @staticmethod
    def path(collection: str, resource_id: str) -> str:
        """`/{collection}/{id}`, or UnsafeIdError (nothing is sent) for an id that could be
        changed on its way (`..`, `/`, `%2e`, look-alikes, ...)."""
        problem = path_id_problem(str(resource_id))
        if problem:
            shown = escape_controls(str(resource_id)[:100])
            raise UnsafeIdError(f"the Rupa id {shown!r} cannot be sent safely in the URL: it {problem}")
        return f"/{collection}/{quote(str(resource_id), safe='')}"

    def _send(self, method: str, url: str, body: dict | None, retry_on=is_retryable) -> httpx.Response:
        """One logical request through the retry policy; the auth (etl.rupa.auth.RupaAuth) adds
        the token and handles a 401 (one refresh, one more try, then AuthError)."""
        headers = {"Accept": JSONAPI, **NO_COMPRESSION}
        content = None
        if body is not None:
            headers["Content-Type"] = JSONAPI
            content = json.dumps(body)
        try:
            for attempt in retrying(self.retry, retry_on=retry_on):
                with attempt:
                    self.requests += 1
                    request = self.http.build_request(method, url, headers=headers, content=content)
                    response = send_capped(self.http, request, self.settings.max_response_bytes,
                                           auth=self._auth)
                    self.requests += len(response.history)  # the 401 the auth retried after
                    raise_for_retryable(response)
        except (RetryableStatus, httpx.TransportError) as exc:
            raise unreachable("Rupa", self.settings.base_url, "RUPA_BASE_URL", exc) or ApiError(
                f"Rupa {method} {urlsplit(url).path} failed: {describe_transport_error(exc)}") from None
        return response

    def request(self, method: str, path_or_url: str, body: dict | None = None, *,
                idempotent: bool = True) -> dict:
        """Send a JSON:API request and return the response document. A 401 refreshes the token
        once and tries again; a second 401 is an AuthError (etl.rupa.auth.RupaAuth).
        `idempotent=False`: only failures that surely left the request unprocessed are retried
        (see etl.http.is_retryable_unsent)."""
        url = self._url(path_or_url)
        response = self._send(method, url, body, is_retryable if idempotent else is_retryable_unsent)
        return self._document(response, body)

    def _document(self, response: httpx.Response, sent: dict | None = None) -> dict:
        status = response.status_code
        if over_cap(response):
            raise RupaApiError(
                f"Rupa answered {escape_controls(urlsplit(str(response.request.url)).path)} with more "
                f"than {size_text(self.settings.max_response_bytes)} (RUPA_MAX_RESPONSE_BYTES); "
                "lower RUPA_PAGE_SIZE or raise the cap", status=status)
        try:
            doc = json.loads(response.content) if response.content else None
        except ValueError:
            doc = None
        values, known = _strings(sent or {}), _keys(sent or {})
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if status >= 400:
            if isinstance(errors, list) and errors:
                raise RupaApiError(f"Rupa API error {describe_errors(status, errors, values, known)}",
                                   status=status, errors=errors)
            raise RupaApiError(f"Rupa API error HTTP {status}", status=status)
        if not isinstance(doc, dict):
            raise RupaApiError(f"Rupa answered HTTP {status} with a body that is not a JSON document", status=status)
        if errors and "data" not in doc:
            listed = errors if isinstance(errors, list) else []
            raise RupaApiError(f"Rupa API error {describe_errors(status, listed, values, known)}", status=status,
                               errors=listed)
        return doc

    def _next_url(self, doc: dict, current: str) -> str | None:
        links = doc.get("links") or {}
        nxt = links.get("next") if isinstance(links, dict) else None
        if isinstance(nxt, dict):  # JSON:API 1.1 link object
            nxt = nxt.get("href")
        if not nxt:
            return None
        absolute = urljoin(current, str(nxt))
        parts = urlsplit(absolute)
        if (parts.scheme.lower(), parts.netloc.lower()) != (self._origin[0].lower(), self._origin[1].lower()):
            raise RupaApiError("Rupa's links.next points at another host; refusing to send the token there")
        return absolute

    # ---- list endpoints ------------------------------------------------------------------------
    def first_page_url(self, path: str) -> str:
        return f"{self._url(path)}?page%5Bsize%5D={self.settings.page_size}"

    def pages(self, path: str, *, start_url: str | None = None) -> Iterator[Page]:
        """Every page of a list endpoint, from `start_url` (a stored `next` link) or the first.
        Raises RupaPageLoop when a `next` link repeats a page of this run, RupaPageBudget after
        RUPA_MAX_PAGES pages."""
        url: str | None = start_url or self.first_page_url(path)
        seen: set[tuple] = set()
        budget = self.settings.max_pages
        while url:
            if len(seen) >= budget:
                raise RupaPageBudget(
                    f"Rupa sent {budget} pages of {path} without an end (RUPA_MAX_PAGES={budget}); "
                    "if the clinic really has that many, raise RUPA_MAX_PAGES: the next run goes on "
                    "from here")
            seen.add(page_key(url))
            doc = self.request("GET", url)
            data = doc.get("data")
            if not isinstance(data, list):
                raise RupaApiError(f"Rupa {urlsplit(url).path} did not return a list of resources")
            found = doc.get("meta")
            meta = found if isinstance(found, dict) else {}
            total = meta.get("total") if isinstance(meta.get("total"), int) else None
            next_url = self._next_url(doc, url)
            if next_url is not None and page_key(next_url) in seen:
                raise RupaPageLoop(
                    f"Rupa's links.next for {path} repeats a page already read in this run (after "
                    f"{len(seen)} pages); paging would never end, so this run stops and the next "
                    "one starts over")
            yield Page(url=url, data=data, next_url=next_url, total=total)
            url = next_url

    def iter_resources(self, path: str) -> Iterator[dict]:
        for page in self.pages(path):
            yield from page.data

    def list_patients(self) -> Iterator[dict]:
        return self.iter_resources("/patients")

    def list_lab_tests(self) -> Iterator[dict]:
        return self.iter_resources("/lab_tests")

    def get_patient(self, patient_id: str) -> dict:
        return self.request("GET", self.path("patients", patient_id))["data"]

    # ---- writes ----------------------------------------------------------------------------------
    def create_patient(self, first_name: str, last_name: str, email: str, **attributes: Any) -> dict:
        """`POST /patients`. Rupa returns the existing patient for the same first name, last name
        and email, so retrying after a dropped connection cannot create a duplicate."""
        attrs = {"first_name": first_name, "last_name": last_name, "email": email, **attributes}
        doc = self.request("POST", "/patients", {"data": {"type": "patient", "attributes": attrs}})
        return _resource(doc, "patient")

    def create_order_intent(self, patient_id: str, *, return_url: str,
                            lab_test_ids: Iterable[str] = ()) -> OrderIntent:
        """`POST /order_intents`: a cart for the practitioner to finish at `checkout_url`.
        Rupa takes no idempotency key, so only failures that surely left the request unprocessed
        are retried here; any other failure raises ApiError and the caller records the outcome
        as unknown (etl.checkout.intents sends it again on its next run and counts it)."""
        body = {"data": {
            "type": "order_intent",
            "attributes": {"return_url": return_url},
            "relationships": {
                "patient": {"data": {"type": "patient", "id": patient_id}},
                "lab_tests": {"data": [{"type": "lab_test", "id": t} for t in lab_test_ids]},
            },
        }}
        res = _resource(self.request("POST", "/order_intents", body, idempotent=False), "order_intent")
        checkout = (res.get("attributes") or {}).get("checkout_url")
        if not checkout:
            raise RupaApiError("Rupa created an order intent without a checkout_url")
        return OrderIntent(id=str(res.get("id")), checkout_url=str(checkout), resource=res)


def _resource(doc: dict, kind: str) -> dict:
    data = doc.get("data")
    if not isinstance(data, dict) or not data.get("id"):
        raise RupaApiError(f"Rupa did not return a {kind} resource")
    return data


def open_client(settings: Settings, engine: Engine | None = None) -> RupaClient:
    """A client for `settings.rupa` (validated), its tokens from RUPA_API_TOKEN or the warehouse."""
    rupa = settings.rupa.validated()
    settings = replace(settings, rupa=rupa)
    http = make_client(rupa.base_url, settings.retry, rupa.network)
    try:
        auth = token_source(settings, engine, http)
    except Exception:
        http.close()
        raise
    return RupaClient(rupa, settings.retry, auth, http)


# ---- the Airflow Test button (etl.airflow.hooks) -------------------------------------------------
CHECK_REFRESH_TOKEN = "labsync-connection-test"  # a refresh token nobody was given


def check_credentials(rupa: RupaSettings, retry: RetrySettings) -> str:
    """Prove that these settings reach Rupa and that it accepts the credentials, changing
    nothing. A ready access token: one page of one lab test (no patient data) is asked for.
    Client id and secret alone: Rupa's authorization-code flow issues no token without a person's
    consent, but its token endpoint authenticates the client before it looks at the grant, so a
    refresh with a made-up refresh token answers `invalid_grant` for good credentials and
    `invalid_client` (or 401) for bad ones. The stored tokens are not touched.

    Returns one sentence without secrets; raises ConfigError, AuthError or ApiError."""
    rupa = rupa.validated()
    with make_client(rupa.base_url, retry, rupa.network, concurrency=1) as http:
        if rupa.api_token:
            client = RupaClient(replace(rupa, page_size=1), retry, StaticToken(rupa.api_token), http)
            try:
                client.request("GET", client.first_page_url("/lab_tests"))
            except AuthError as exc:
                raise AuthError("Rupa refused the access token (HTTP 401)", status=exc.status) from None
            return f"Rupa accepted the access token at {rupa.base_url}"
        response = post_grant(http, rupa, retry, {"grant_type": "refresh_token",
                                                  "refresh_token": CHECK_REFRESH_TOKEN})
    _, body = access_token_from(response)
    error = body.get("error")
    if response.status_code == 401 or error == "invalid_client":
        raise AuthError("Rupa refused the client id and secret (invalid_client)", status=response.status_code)
    if error == "invalid_grant":
        return (f"Rupa accepted the client id and secret at {rupa.base_url}; run `labsync rupa "
                "authorize` once so the tasks have tokens")
    raise ApiError(f"Rupa token endpoint answered HTTP {response.status_code} to a test refresh",
                   status=response.status_code)
