"""The batch summary page a program manager opens: counts per state, rejected rows with their
reasons, accepted clientOrderIds with their LetsGetChecked order-item ids. One self-contained
HTML file, no scripts, written beside the processed file. Every cell is HTML-escaped; error
texts (ledger errors, the note) also pass the redaction point (etl.redact)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from etl.redact import clean

STATE_HELP = {
    "accepted": "LetsGetChecked accepted the order",
    "already_settled": "an earlier batch already settled this clientOrderId, so nothing was sent",
    "conflict": "already submitted earlier with other data and cannot be changed (nothing new was sent)",
    "rejected": "LetsGetChecked refused the order; see its reason below and in labsync status",
    "failed": "could not be sent yet; labsync sends these again by itself on its next runs",
    "pending": "sending did not finish; labsync sends these again by itself on its next runs",
    "queued": "not sent yet (the load stopped or never ran); labsync sends these on its next runs",
    "given_up": "failed on every attempt: needs a person. Fix the cause, then drop the file again "
    "(or run labsync retry --given-up)",
    "unconfirmed": "LetsGetChecked answered without the order it documents (e.g. a proxy's page); "
    "not counted as accepted: labsync sends these again by itself on its next runs",
    "busy": "another run was sending this order at the same time",
    "duplicate": "the same clientOrderId appeared twice in this batch",
    "rejected before sending": "did not pass validation, so nothing was sent; see the rejected rows below",
    # Rupa order intents (etl.rupa.intents)
    "created": "Rupa created the cart; send the practitioner to its checkout link below",
    "already created": "this row_id got its cart in an earlier run; nothing was sent again",
    "rejected by Rupa": "Rupa refused the row; see the note below",
    "unknown outcome": "the request went out but no answer came back; the next run sends it again",
    "re-sent after an unknown outcome": "sent again after an earlier request got no answer: Rupa may hold a second, unused cart",
}

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:70rem}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}.n{text-align:right}.bad{color:#a00}.ok{color:#070}.muted{color:#666}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(
    *,
    file_name: str,
    outcome: str,
    counts: Mapping[str, int],
    rejected: Sequence[Mapping] = (),
    accepted: Sequence[Mapping] = (),
    problem_rows: Sequence[Mapping] = (),
    note: str | None = None,
    generated_at: datetime | None = None,
    title: str = "Order batch",
    checkout: Sequence[Mapping] = (),
    id_label: str = "clientOrderId",
    item_statuses: Mapping[str, Sequence[Mapping]] | None = None,
) -> str:
    """The page as a string. `rejected`: reject-report rows (line, client_order_id, column,
    value, reason); `accepted`: ledger rows (client_order_id, line, order_item_ids);
    `problem_rows`: ledger rows that did not go through (failed/pending/rejected by the vendor);
    `checkout`: Rupa order-intent rows (line, row_id, patient, rupa_patient_id, state,
    checkout_url, note), each with a clickable link for the practitioner;
    `item_statuses`: clientOrderId -> its items as etl.lgc.lifecycle.item_statuses gives them."""
    when = (generated_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>labsync: {_e(file_name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)} <code>{_e(file_name)}</code></h1>",
        f"<p><strong>{_e(outcome)}</strong> <span class='muted'>({when})</span></p>",
    ]
    if note:
        parts.append(f"<p>{_e(clean(note, limit=None))}</p>")
    rows = [(state, n, STATE_HELP.get(state, "")) for state, n in counts.items() if n]
    if rows:
        parts.append("<h2>Rows by outcome</h2>")
        parts.append(_table(("outcome", "rows", "meaning"), rows))
    if problem_rows:
        parts.append("<h2 class='bad'>Orders that did not go through</h2>")
        parts.append(_table(
            ("line", "clientOrderId", "state", "HTTP status", "reason"),
            [(r.get("line"), r.get("client_order_id"), r.get("state"), r.get("http_status"), clean(r.get("last_error")))
             for r in problem_rows],
        ))
    if rejected:
        parts.append("<h2 class='bad'>Rejected rows (not sent): fix these and drop them in a new file</h2>")
        parts.append(_table(
            ("line", id_label, "column", "value", "reason"),
            [(r.get("line"), r.get("client_order_id"), r.get("column"), r.get("value"), r.get("reason")) for r in rejected],
        ))
    if checkout:
        parts.append("<h2>Checkout links: one per patient, for the practitioner</h2>")
        parts.append(_checkout_table(checkout))
    if accepted:
        parts.append("<h2 class='ok'>Accepted orders</h2>")
        statuses = item_statuses or {}
        parts.append(_table(
            ("line", "clientOrderId", "LetsGetChecked order items", "item statuses"),
            [(r.get("line"), r.get("client_order_id"), _items(r.get("order_item_ids")),
              _statuses(statuses.get(r.get("client_order_id")))) for r in accepted],
        ))
    parts.append("</body></html>")
    return "\n".join(parts)


def _checkout_table(rows: Sequence[Mapping]) -> str:
    """Like _table, with the checkout URL as a link (http/https only; everything escaped)."""
    from urllib.parse import urlsplit

    head = "".join(f"<th>{h}</th>" for h in ("line", "row_id", "patient", "Rupa patient", "state",
                                             "checkout", "note"))
    body = []
    for r in rows:
        url = r.get("checkout_url") or ""
        link = (f"<a class='checkout' href='{_e(url)}' target='_blank' rel='noopener'>open checkout</a>"
                if urlsplit(url).scheme in ("http", "https") else "")
        cells = [_e(r.get(k)) for k in ("line", "row_id", "patient", "rupa_patient_id", "state")]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + f"<td>{link}</td>"
                    + f"<td>{_e(r.get('note'))}</td></tr>")
    return f"<table id='checkout'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _items(items) -> str:
    if not items:
        return ""
    return ", ".join(f"{i.get('code', '?')}: {i.get('id', '?')}" if isinstance(i, Mapping) else str(i) for i in items)


def _statuses(items) -> str:
    """`GLCS: KitDispatched` per item; before `labsync track` first asked, nothing is known."""
    if not items:
        return "not tracked yet"
    return ", ".join(f"{i.get('code') or i.get('item_id')}: {i.get('status') or 'unknown'}"
                     + (f" ({i['cancel_state']})" if i.get("cancel_state") else "") for i in items)


def write(path: Path, page: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
