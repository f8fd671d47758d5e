"""LetsGetChecked's Outreach API: the results letters it sends to the patient and to the
patient's primary-care provider (PCP).

What LetsGetChecked publishes of it (summarised in the public catalogue api-evangelist/
letsgetchecked: apis.yml, data-model/, asyncapi/): notifications per program with date filters
and `X-Continuation-Token` paging, one notification by kit barcode, a results-letters feed walked
from a start event, and a letter document by `letterId` (`<audience>_<barcode>`, e.g.
`patient_LGC-2787-3959-3483`). A notification has `barcode`, `type` (`PatientResultsLetter`,
`PcpResultsLetter`), `status` (`DeliverySent`), `failureReason` (documented as always null) and
`timestamp`. The `outreach` webhook carries the same body and no `callbackURL`.

**No paths are published.** They are modelled on the Results API (v1, by barcode) and kept here,
in `PATHS`, the one place to change when LetsGetChecked's are known (the sandbox serves the same):

    GET {base}/{clientId}/api/v1/outreach/programs/{program}/notifications?from=&to=
        -> {"notifications": [...]}, next page asked with the answer's X-Continuation-Token header
    GET {base}/{clientId}/api/v1/outreach/notifications/{barcode}?type=PatientResultsLetter
        -> one notification (404: none)
    GET {base}/{clientId}/api/v1/outreach/letters-feed?startEventId=N&limit=M
        -> {"events": [{"eventId": N, "letterId": ..., barcode, type, status, timestamp}, ...]}
    GET {base}/{clientId}/api/v1/outreach/letters/{letterId}   -> the PDF (404: none)

Every call goes through `LgcApi` (etl.lgc.orders_api): the same token, retries, size cap and
vendor budget as the Orders and Results calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

from etl.errors import ApiError
from etl.lgc.orders_api import LgcApi, get_field, parse_time, text_of

PATHS = {
    "program_notifications": "api/v1/outreach/programs/{program}/notifications",
    "notification": "api/v1/outreach/notifications/{barcode}",
    "feed": "api/v1/outreach/letters-feed",
    "letter": "api/v1/outreach/letters/{letter_id}",
}
CONTINUATION = "X-Continuation-Token"
PDF = "application/pdf"
AUDIENCES = {"PatientResultsLetter": "patient", "PcpResultsLetter": "pcp"}
LETTER_TYPES = {v: k for k, v in AUDIENCES.items()}
DELIVERY_SENT = "DeliverySent"
MAX_PAGES = 10_000  # a paging loop that never ends is the vendor's bug: stop, say so


@dataclass(frozen=True)
class Notification:
    barcode: str
    type: str  # PatientResultsLetter | PcpResultsLetter
    status: str | None
    failure_reason: str | None
    timestamp: datetime | None
    event_id: int | None = None  # its place in the letters feed, when read from the feed

    @property
    def audience(self) -> str:
        return AUDIENCES.get(self.type, self.type.casefold()[:20])

    @property
    def letter_id(self) -> str:
        return f"{self.audience}_{self.barcode}"


def parse_notification(data: Any) -> Notification | None:
    """A notification (an API answer, a feed event or an `outreach` webhook body), or None when
    it lacks a barcode or a letter type. Keys in any casing; never raises."""
    if not isinstance(data, Mapping):
        return None
    barcode = text_of(get_field(data, "barcode"), 50)
    kind = text_of(get_field(data, "type"), 40)
    if barcode is None or kind is None:
        return None
    kind = next((k for k in AUDIENCES if k.casefold() == kind.casefold()), kind)
    event = get_field(data, "eventId")
    try:
        event_id = int(event) if event is not None else None
    except (TypeError, ValueError):
        event_id = None
    return Notification(barcode, kind, text_of(get_field(data, "status"), 40),
                        text_of(get_field(data, "failureReason"), 500), parse_time(get_field(data, "timestamp")),
                        event_id)


def _url(api: LgcApi, name: str, **parts: str) -> str:
    path = PATHS[name].format(**{k: quote(v, safe="") for k, v in parts.items()})
    return f"{api.lgc.base_url}/{quote(api.lgc.client_id, safe='')}/{path}"


def _json(response, what: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ApiError(f"LetsGetChecked {what}: the answer is not JSON", status=response.status_code) from None


async def get_notification(api: LgcApi, barcode: str, letter_type: str | None = None) -> Notification | None:
    """The notification of this kit (of this letter type), or None (404)."""
    url = _url(api, "notification", barcode=barcode)
    if letter_type:
        url += "?" + urlencode({"type": letter_type})
    response = await api.get(url, what="GET outreach notification")
    if response is None:
        return None
    found = parse_notification(_json(response, "GET outreach notification"))
    if found is None or found.barcode != barcode:
        raise ApiError("LetsGetChecked GET outreach notification: the answer is not this kit's notification",
                       status=200)
    return found


async def program_notifications(api: LgcApi, program: str, *, since: datetime | None = None,
                                until: datetime | None = None) -> list[Notification]:
    """Every notification of a program (between two times), all pages."""
    query = {k: v.astimezone(UTC).isoformat().replace("+00:00", "Z")
             for k, v in (("from", since), ("to", until)) if v is not None}
    url = _url(api, "program_notifications", program=program) + ("?" + urlencode(query) if query else "")
    out: list[Notification] = []
    token: str | None = None
    for _ in range(MAX_PAGES):
        response = await api.get(url, what="GET outreach notifications",
                                 headers={CONTINUATION: token} if token else None)
        if response is None:
            return out
        doc = _json(response, "GET outreach notifications")
        items = get_field(doc, "notifications") if isinstance(doc, Mapping) else doc
        out.extend(n for n in map(parse_notification, items if isinstance(items, list) else []) if n)
        token = response.headers.get(CONTINUATION)
        if not token:
            return out
    raise ApiError(f"LetsGetChecked GET outreach notifications: more than {MAX_PAGES} pages; stopped")


async def letters_feed(api: LgcApi, start_event: int, *, limit: int = 100) -> list[Notification]:
    """One page of the letters feed from `start_event` (events carry their `event_id`)."""
    url = _url(api, "feed") + "?" + urlencode({"startEventId": start_event, "limit": limit})
    response = await api.get(url, what="GET letters feed")
    if response is None:
        return []
    doc = _json(response, "GET letters feed")
    events = get_field(doc, "events") if isinstance(doc, Mapping) else doc
    return [n for n in map(parse_notification, events if isinstance(events, list) else []) if n]


async def get_letter(api: LgcApi, letter_id: str) -> bytes | None:
    """The letter's document (PDF bytes as sent), or None (404)."""
    response = await api.get(_url(api, "letter", letter_id=letter_id), accept=PDF, what="GET letter")
    return None if response is None else response.content
