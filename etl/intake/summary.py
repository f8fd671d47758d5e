"""The summary page a program manager opens: what needs doing first, then the totals, where the
file and its reports are, the next steps, and the rows themselves. One self-contained HTML file
(Jinja2 templates in etl/intake/templates/, the stylesheet inline, no scripts), written beside
the processed file.

Every value is escaped by Jinja2's autoescape; error texts (ledger errors, the note) also pass
the redaction point (etl.redact). Links are relative (the reports sit beside the page) and
percent-encoded, so the page works wherever the folder is copied.

Two entry points:
- `batch_page(...)`: an order batch, from the warehouse's counts (etl.orders.inbox.render). The
  page names six outcomes, and they add up to the rows of the file (the reconciliation line):
  rows in file = rejected + accepted + conflict + failed + pending + already settled. The outbox
  has finer states; each is counted under one of the six and the page says so (PAGE_OUTCOME).
- `render(...)`: any other page (an unusable or already-processed file, the Rupa checkout
  report), from a headline, counts and rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from urllib.parse import quote, urlsplit

from etl.redact import clean
from etl.states import OutboxState

MAX_SHOWN_ROWS = 100  # rows per table; the rest are in the CSVs (or `labsync status --batch`)

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
    # Rupa order intents (etl.checkout.intents)
    "created": "Rupa created the cart; send the practitioner to its checkout link below",
    "already created": "this row_id got its cart in an earlier run; nothing was sent again",
    "rejected by Rupa": "Rupa refused the row; see the note below",
    "unknown outcome": "the request went out but no answer came back; the next run sends it again",
    "re-sent after an unknown outcome": "sent again after an earlier request got no answer: Rupa may hold a second, unused cart",
}

# ---- an order batch's six outcomes -------------------------------------------------------------
REJECTED, ACCEPTED, CONFLICT, FAILED, PENDING, SETTLED = (
    "rejected", "accepted", "conflict", "failed", "pending", "already settled")
PAGE_OUTCOMES = (REJECTED, ACCEPTED, CONFLICT, FAILED, PENDING, SETTLED)
# every outbox state is counted under exactly one page outcome (rejected_rows -> rejected); keyed
# by str: rows read back carry plain strings, which look up the StrEnum keys by equal value
PAGE_OUTCOME: dict[str, str] = {
    OutboxState.REJECTED: REJECTED, OutboxState.ACCEPTED: ACCEPTED, OutboxState.CONFLICT: CONFLICT,
    OutboxState.FAILED: FAILED, OutboxState.UNCONFIRMED: FAILED, OutboxState.GIVEN_UP: FAILED,
    OutboxState.PENDING: PENDING, OutboxState.QUEUED: PENDING, OutboxState.ALREADY_SETTLED: SETTLED,
}
TONE = {REJECTED: "bad", ACCEPTED: "ok", CONFLICT: "bad", FAILED: "warn", PENDING: "warn", SETTLED: "info"}
MEANING = {
    REJECTED: "not sent: the row broke a rule of the file's contract (it is in the fix file), or "
              "LetsGetChecked refused it",
    ACCEPTED: "sent by this batch and accepted by LetsGetChecked",
    CONFLICT: "the clientOrderId was sent earlier with other data; LetsGetChecked keeps the first, "
              "nothing new was sent",
    FAILED: "not through yet: no usable answer; labsync sends these again by itself (given-up rows "
            "need a person)",
    PENDING: "not through yet: not sent, or sending did not finish; labsync sends these again by itself",
    SETTLED: "an earlier batch already sent this clientOrderId and it is done; nothing was sent again",
}
# what a state counted under another name is, in the words of the page
FOLDED = {
    OutboxState.REJECTED: "{n} refused by LetsGetChecked (see “Orders that did not go through”)",
    OutboxState.UNCONFIRMED: "{n} unconfirmed (LetsGetChecked answered without the order; sent again "
                             "by itself)",
    OutboxState.GIVEN_UP: "{n} given up after failing on every attempt: these need a person",
    OutboxState.QUEUED: "{n} not sent yet (queued)",
}


@cache
def _env():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    return Environment(loader=PackageLoader("etl.intake", "templates"),
                       autoescape=select_autoescape(default=True, default_for_string=True),
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _when(generated_at: datetime | None) -> str:
    return (generated_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")


def _page(**context) -> str:
    defaults = dict(title="Order batch", tone="", sublines=(), note=None, tiles=(), bar=(),
                    bar_label="", reconciliation=None, reconciliation_tone="", folded=(), links=(),
                    steps=(), legend=(), problem_rows=(), problem_more=None, rejected=(),
                    rejected_title="Rejected rows (not sent)", rejected_more=None,
                    id_label="clientOrderId", checkout=(), accepted=(), accepted_more=None,
                    settled=(), settled_more=None)
    return _env().get_template("summary.html").render({**defaults, **context})


@dataclass(frozen=True)
class Link:
    label: str  # what it is: "the rows to fix"
    path: str  # the file's name beside the page (relative), as shown
    text: str = ""  # shown instead of `path` (e.g. "processed/orders.csv")

    def as_dict(self) -> dict:
        return {"label": self.label, "href": quote(self.path), "text": self.text or self.path}


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
    tone: str = "",
    steps: Sequence[str] = (),
    links: Sequence[Link] = (),
) -> str:
    """A page from a headline (`outcome`) and counts. `rejected`: reject-report rows (line, row,
    client_order_id, column, value, reason); `accepted`: ledger rows (client_order_id, line,
    order_item_ids); `problem_rows`: ledger rows that did not go through; `checkout`: Rupa
    order-intent rows (line, row_id, patient, rupa_patient_id, state, checkout_url, note), each
    with a clickable link (http/https only); `item_statuses`: clientOrderId -> its items as
    etl.orders.lifecycle.item_statuses gives them."""
    tiles = [{"name": state, "count": n, "tone": _tone_of(state), "help": STATE_HELP.get(state, "")}
             for state, n in counts.items() if n]
    legend = [(state, STATE_HELP[state]) for state, n in counts.items() if n and state in STATE_HELP]
    return _page(
        file_name=file_name, title=title, generated_at=_when(generated_at), headline=outcome, tone=tone,
        note=clean(note, limit=None) if note else None, tiles=tiles, legend=legend, steps=steps,
        links=[link.as_dict() for link in links],
        problem_rows=[_problem(r) for r in problem_rows],
        rejected=_grouped(rejected), id_label=id_label,
        checkout=[{**r, "link": _http(r.get("checkout_url"))} for r in checkout],
        accepted=_accepted(accepted, item_statuses or {}),
    )


def _tone_of(state: str) -> str:
    if state in ("accepted", "created", "already created"):
        return "ok"
    if state in ("already_settled", "already settled"):
        return "info"
    if state.startswith("rejected") or state in ("conflict", "given_up"):
        return "bad"
    return "warn"


def _http(url) -> str:
    return url if url and urlsplit(url).scheme in ("http", "https") else ""


def batch_page(
    *,
    file_name: str,
    total_rows: int,
    rejected_rows: int,
    counts: Mapping[str, int],
    rejected: Sequence[Mapping] = (),
    outbox_rows: Sequence[Mapping] = (),
    item_statuses: Mapping[str, Sequence[Mapping]] | None = None,
    where: str | None = None,
    reports: Mapping[str, str] | None = None,
    batch_id: int | None = None,
    max_rows: int = MAX_SHOWN_ROWS,
    generated_at: datetime | None = None,
) -> str:
    """An order batch's page. `counts`: outbox rows per OutboxState; `rejected_rows`: rows the
    validation rejected (`rejected`: their problems, as records.rejected gives them, at least the
    first `max_rows` rows); `outbox_rows`: outbox.rows_of; `where`: the file's place in the inbox
    (`processed/orders.csv`); `reports`: {"rejects": name, "fix": name} of the CSVs beside it."""
    totals = page_counts(counts, rejected_rows)
    accounted = sum(totals.values())
    reports = reports or {}
    headline, tone, sublines = _headline(totals, counts, total_rows)
    if accounted == total_rows:
        reconciliation = (f"{total_rows:,} rows in the file = "
                          + " + ".join(f"{totals[name]:,} {name}" for name in PAGE_OUTCOMES))
        reconciliation_tone = ""
    else:  # never hidden: a row without an outcome is a bug to see
        reconciliation = (f"These counts do not add up: {total_rows:,} rows in the file, but "
                          + " + ".join(f"{totals[name]:,} {name}" for name in PAGE_OUTCOMES)
                          + f" = {accounted:,}")
        reconciliation_tone = "bad"
    folded = [text.format(n=f"{counts[state]:,}") + f" (counted as {PAGE_OUTCOME[state]})"
              for state, text in FOLDED.items() if counts.get(state)]
    if rejected_rows and counts.get(OutboxState.REJECTED):
        folded.insert(0, f"{rejected_rows:,} rejected by labsync's checks before sending (in the fix file)")
    bar = [{"name": name, "count": totals[name], "tone": TONE[name],
            "percent": round(100 * totals[name] / accounted, 3)}
           for name in PAGE_OUTCOMES if totals[name]] if accounted else []
    links = []
    if where:
        links.append(Link("The file", Path(where).name, where))
    if reports.get("fix"):
        links.append(Link(f"The {rejected_rows:,} rows to fix and drop back, with their problems", reports["fix"]))
    if reports.get("rejects"):
        links.append(Link("Every problem, one line each", reports["rejects"]))
    by_state: dict[str, list[Mapping]] = {}
    for r in outbox_rows:
        by_state.setdefault(r["state"], []).append(r)
    accepted = by_state.get(OutboxState.ACCEPTED, [])
    settled = by_state.get(OutboxState.ALREADY_SETTLED, [])
    problems = [r for r in outbox_rows if r["state"] not in (OutboxState.ACCEPTED, OutboxState.ALREADY_SETTLED)]
    groups = _grouped(rejected)
    status_hint = (f"; the full list: labsync status --batch {batch_id} --limit 0" if batch_id is not None else "")
    return _page(
        file_name=file_name, generated_at=_when(generated_at), headline=headline, tone=tone,
        sublines=sublines,
        tiles=[{"name": name, "count": totals[name], "tone": TONE[name], "help": MEANING[name]}
               for name in PAGE_OUTCOMES],
        bar=bar, bar_label=", ".join(f"{s['name']} {s['count']}" for s in bar),
        reconciliation=reconciliation, reconciliation_tone=reconciliation_tone, folded=folded,
        links=[link.as_dict() for link in links],
        steps=_next_steps(totals, counts, rejected_rows, reports),
        legend=[(name, MEANING[name]) for name in PAGE_OUTCOMES if totals[name]],
        problem_rows=[_problem(r) for r in problems[:max_rows]],
        problem_more=_more(len(problems), max_rows, status_hint),
        rejected=groups[:max_rows],
        rejected_title="Rejected rows (nothing was sent for them): every problem of a row together",
        rejected_more=_more(rejected_rows, max_rows, "; every one is in "
                            + " and ".join(reports[k] for k in ("fix", "rejects") if reports.get(k))
                            if reports else ""),
        accepted=_accepted(accepted[:max_rows], item_statuses or {}),
        accepted_more=_more(len(accepted), max_rows, status_hint),
        settled=[{"line": r.get("line"), "client_order_id": r.get("client_order_id"),
                  "item_ids": _items(r.get("order_item_ids"))} for r in settled[:max_rows]],
        settled_more=_more(len(settled), max_rows, status_hint),
    )


def page_counts(counts: Mapping[str, int], rejected_rows: int) -> dict[str, int]:
    """The six page outcomes from the outbox's states and the validation's rejected rows."""
    totals = dict.fromkeys(PAGE_OUTCOMES, 0)
    totals[REJECTED] = rejected_rows
    for state, n in counts.items():
        totals[PAGE_OUTCOME.get(state, FAILED)] += n  # an unknown state: not through, never hidden
    return totals


def _rows(n: int) -> str:
    return f"{n:,} row" + ("" if n == 1 else "s")


def _headline(totals: Mapping[str, int], counts: Mapping[str, int], total: int) -> tuple[str, str, list[str]]:
    """The one sentence that says what needs doing, its tone, and the other news in short lines."""
    given_up = counts.get(OutboxState.GIVEN_UP, 0)
    open_rows = totals[FAILED] + totals[PENDING] - given_up
    of = f" of {total:,}" if total else ""
    sub = []
    if totals[REJECTED]:
        head, tone = f"{totals[REJECTED]:,}{of} rows need fixing — nothing was sent for them.", "bad"
    elif given_up:
        head, tone = f"{given_up:,}{of} rows need a person — they failed on every attempt.", "bad"
    elif totals[CONFLICT]:
        head, tone = (f"{totals[CONFLICT]:,}{of} rows conflict with orders sent earlier with other data "
                      "— nothing new was sent for them.", "bad")
    elif open_rows:
        head, tone = (f"{open_rows:,}{of} rows have not gone through yet — labsync sends them again by "
                      "itself.", "warn")
    elif total == 0:
        return "The file has no rows — nothing was sent.", "warn", []
    else:
        head, tone = f"All {total:,} rows went through — nothing to do.", "ok"
    if totals[ACCEPTED]:
        sub.append(f"{_rows(totals[ACCEPTED])} accepted by LetsGetChecked in this batch.")
    if totals[SETTLED]:
        sub.append(f"{_rows(totals[SETTLED])} already settled by an earlier batch: nothing sent again.")
    if given_up and not head.startswith(f"{given_up:,}{of} rows need a person"):
        sub.append(f"{_rows(given_up)} failed on every attempt and need a person.")
    if totals[CONFLICT] and "conflict" not in head:
        sub.append(f"{_rows(totals[CONFLICT])} conflict with orders sent earlier with other data.")
    if open_rows and "not gone through" not in head:
        sub.append(f"{_rows(open_rows)} not through yet: labsync sends them again by itself.")
    return head, tone, sub


def _next_steps(totals, counts, rejected_rows: int, reports: Mapping[str, str]) -> list[str]:
    steps = []
    fix = reports.get("fix")
    if rejected_rows and fix:
        steps.append(f"Open {fix} in Excel: it holds only the {_rows(rejected_rows)} that need fixing, "
                     "with what is wrong in its first column (problems).")
        steps.append("Fix those cells, save as 'CSV UTF-8 (comma delimited)' and drop the file into the "
                     "inbox under any name: only those rows are sent; the problems column is ignored. "
                     "Do not drop the whole original file again unless you fixed it there too (that also "
                     "works: rows that already went through are recognised and not sent twice).")
        steps.append("Before typing in Excel, format columns such as phone_country_code, dob, "
                     "postal_code and long ids as Text, so Excel keeps +1, 1961-02-11, 02134 and long "
                     "numbers as typed.")
    elif rejected_rows:
        steps.append(f"Fix the {_rows(rejected_rows)} listed below and drop them in a new file.")
    if counts.get(OutboxState.REJECTED):
        steps.append(f"LetsGetChecked refused {_rows(counts[OutboxState.REJECTED])}: read the reason under "
                     "“Orders that did not go through”, correct the row and drop it in a new file.")
    if counts.get(OutboxState.GIVEN_UP):
        steps.append(f"{_rows(counts[OutboxState.GIVEN_UP])} failed on every attempt: fix the cause shown "
                     "below, then drop this file again or run labsync retry --given-up.")
    if totals[CONFLICT]:
        steps.append("A conflict means the clientOrderId was sent before with other data and "
                     "LetsGetChecked keeps the first order; for a new order, give the row a new clientOrderId.")
    waiting = totals[FAILED] + totals[PENDING] - counts.get(OutboxState.GIVEN_UP, 0)
    if waiting:
        steps.append(f"Nothing to do for the {_rows(waiting)} not through yet: labsync sends them again "
                     "by itself on its next runs and writes this page again.")
    if not steps:
        steps.append("Nothing to do. LetsGetChecked's item statuses appear under the accepted orders "
                     "once labsync has tracked them (labsync track).")
    return steps


def _more(n: int, shown: int, where: str) -> str | None:
    if n <= shown:
        return None
    return f"Showing the first {shown:,} of {n:,}{where}."


def _problem(r: Mapping) -> dict:
    state = r.get("state")
    page = PAGE_OUTCOME.get(state, state) if state is not None else None
    return {"line": r.get("line"), "client_order_id": r.get("client_order_id"),
            "outcome": page if page == state else f"{page} ({str(state).replace('_', ' ')})",
            "http_status": r.get("http_status"), "reason": clean(r.get("last_error"))}


def _grouped(rejected: Sequence[Mapping]) -> list[dict]:
    """Reject-report rows (one per problem) grouped by the file's row, in file order."""
    groups: dict[int, dict] = {}
    for r in rejected:
        line = r.get("line")
        key = int(line) if line not in (None, "") else -1
        g = groups.get(key)
        if g is None:
            row = r.get("excel_row") or r.get("row") or line
            g = groups[key] = {"line": line, "row": row, "id": r.get("client_order_id"), "problems": []}
        g["problems"].append({"column": r.get("column") or r.get("column_name"), "value": r.get("value"),
                              "reason": r.get("reason")})
    for g in groups.values():  # `row` and `line` compare as text in the template
        g["line"], g["row"] = str(g["line"]), str(g["row"])
    return list(groups.values())


def _accepted(rows: Sequence[Mapping], statuses: Mapping[str, Sequence[Mapping]]) -> list[dict]:
    return [{"line": r.get("line"), "client_order_id": r.get("client_order_id"),
             "item_ids": _items(r.get("order_item_ids")), "statuses": _statuses(_statuses_of(r, statuses))}
            for r in rows]


def _statuses_of(row: Mapping, statuses: Mapping[str, Sequence[Mapping]]) -> Sequence[Mapping] | None:
    client_order_id = row.get("client_order_id")
    return statuses.get(client_order_id) if client_order_id is not None else None


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
