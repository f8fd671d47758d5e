"""The batch summary page a program manager opens: counts per state, rejected rows with their
reasons, accepted clientOrderIds with their LetsGetChecked order-item ids. One self-contained
HTML file, no scripts, written beside the processed file."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

STATE_HELP = {
    "accepted": "LetsGetChecked accepted the order",
    "conflict": "already submitted earlier and cannot be changed (nothing new was sent)",
    "rejected": "LetsGetChecked refused the order; see its reason in labsync status",
    "failed": "could not be sent; drop the file into the inbox again to retry these rows",
    "pending": "sending did not finish; drop the file again to retry",
    "busy": "another run was sending this order at the same time",
    "duplicate": "the same clientOrderId appeared twice in this batch",
    "rejected before sending": "did not pass validation, so nothing was sent; see the rejected rows below",
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
    item_statuses: Mapping[str, Sequence[Mapping]] | None = None,
) -> str:
    """The page as a string. `rejected`: reject-report rows (line, client_order_id, column,
    value, reason); `accepted`: ledger rows (client_order_id, line, order_item_ids);
    `problem_rows`: ledger rows that did not go through (failed/pending/rejected by the vendor);
    `item_statuses`: clientOrderId -> its items as etl.lgc.lifecycle.item_statuses gives them."""
    when = (generated_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>labsync: {_e(file_name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Order batch <code>{_e(file_name)}</code></h1>",
        f"<p><strong>{_e(outcome)}</strong> <span class='muted'>({when})</span></p>",
    ]
    if note:
        parts.append(f"<p>{_e(note)}</p>")
    rows = [(state, n, STATE_HELP.get(state, "")) for state, n in counts.items() if n]
    if rows:
        parts.append("<h2>Rows by outcome</h2>")
        parts.append(_table(("outcome", "rows", "meaning"), rows))
    if problem_rows:
        parts.append("<h2 class='bad'>Orders that did not go through</h2>")
        parts.append(_table(
            ("line", "clientOrderId", "state", "HTTP status", "reason"),
            [(r.get("line"), r.get("client_order_id"), r.get("state"), r.get("http_status"), r.get("last_error"))
             for r in problem_rows],
        ))
    if rejected:
        parts.append("<h2 class='bad'>Rejected rows (not sent): fix these and drop them in a new file</h2>")
        parts.append(_table(
            ("line", "clientOrderId", "column", "value", "reason"),
            [(r.get("line"), r.get("client_order_id"), r.get("column"), r.get("value"), r.get("reason")) for r in rejected],
        ))
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
