"""The program page: one self-contained HTML file per program (inline stylesheet and SVG charts,
no scripts), with a CSV per "needs a person" list (formula-safe, UTF-8 with BOM, CRLF, as every
labsync report), written in the inbox (local folder or object store) under
`programs/<program>/`: `index.html`, `not_registered.csv`, `not_at_lab.csv`,
`results_not_stored.csv`, `unconfirmed_or_given_up.csv`, `letters.csv`.

    render(program: Program) -> str                       the page
    csv_text(program, name) -> str                         one list as CSV text (BOM first)
    write(engine, settings, program=None, ...) -> list[Written]   build, render, store

PHI-free: the page and the CSVs name clientOrderIds, participant ids, item ids, barcodes and kit
codes, never a name, birth date or address (the warehouse tables read hold none).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine

from etl.intake.csvsafe import open_writer
from etl.intake.storage import Store, open_store
from etl.program import charts
from etl.program.report import (
    LETTER_COLUMNS,
    LIST_TITLES,
    LISTS,
    PATH,
    STAGE_LABELS,
    STEP_LABELS,
    Program,
    build,
)
from etl.settings import Settings

FOLDER = "programs"
MAX_SHOWN = 100  # rows per list on the page; the CSV has them all

CSS = """
:root{--ok:#1a7f37;--bad:#b3261e;--warn:#8a5300;--warn-bg:#fff4e0;--info:#0b57d0;--muted:#5f6368;--line:#dadce0}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;padding:0 1.5rem;color:#202124;max-width:72rem;line-height:1.45}
.kicker{margin:0;color:var(--muted);font-size:.9rem}h1{font-size:1.55rem;margin:.3rem 0 .6rem}
h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid var(--line);padding-bottom:.25rem}
h3{font-size:1rem;margin:1.2rem 0 .3rem}
.tiles{display:flex;flex-wrap:wrap;gap:.6rem;margin:1rem 0 .6rem}
.tile{min-width:7.5rem;padding:.6rem .9rem;border-radius:.5rem;background:#f1f3f4;display:flex;flex-direction:column}
.tile .n{font-size:1.6rem;font-weight:600}.tile .label{font-size:.85rem}.tile.warn{background:var(--warn-bg);color:var(--warn)}
table{border-collapse:collapse;margin:.5rem 0;width:100%}td,th{border:1px solid var(--line);padding:.3rem .55rem;text-align:left;vertical-align:top}
th{background:#f8f9fa;font-weight:600}td.n,th.n{text-align:right;white-space:nowrap}
.chart svg{max-width:100%;height:auto}.muted{color:var(--muted)}.more{color:var(--muted);font-style:italic}
.ok{color:var(--ok)}.bad{color:var(--bad)}footer{margin-top:3rem;font-size:.85rem}
@media print{body{margin:0;max-width:none}h2{break-after:avoid}.chart,table{break-inside:avoid}a{color:inherit;text-decoration:none}}
"""

TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>labsync program: {{ p.code }}</title>
<style>{{ css }}</style>
</head>
<body>
<header>
  <p class="kicker">Program · <span class="muted">{{ generated }}</span></p>
  <h1 id="headline">{{ p.code }}: {{ "{:,}".format(p.orders) }} orders, {{ "{:,}".format(p.items) }} kits (order items)</h1>
  <p id="attention-total">{{ person_total }} {{ "entry needs" if person_total == 1 else "entries need" }} a person today (the lists below).</p>
</header>

<section id="stages" aria-label="kits by current stage">
  <h2>Where every kit is now</h2>
  <div class="tiles">
  {% for s in stages %}<div class="tile" data-stage="{{ s }}"><span class="n">{{ "{:,}".format(p.stages[s]) }}</span><span class="label">{{ labels[s] }}</span></div>{% endfor %}
  </div>
  <div class="chart">{{ stage_svg | safe }}</div>
  <table id="order-stages"><thead><tr><th>stage</th><th class="n">kits (order items)</th><th class="n">orders</th></tr></thead><tbody>
  {% for s in stages %}<tr data-stage="{{ s }}"><td>{{ labels[s] }}</td><td class="n">{{ p.stages[s] }}</td><td class="n">{{ p.order_stages[s] }}</td></tr>{% endfor %}
  </tbody></table>
  <p class="muted">An order is at the stage of its least advanced kit still on the way (cancelled or failed only when all its kits are).</p>
</section>

<section id="attention">
  <h2>What needs a person today</h2>
  {% for l in lists %}
  <h3 id="{{ l.name }}">{{ l.title }}: <span class="count">{{ l.rows|length }}</span></h3>
  <p><a href="{{ l.href }}">{{ l.file }}</a> (all {{ l.rows|length }}, for Excel)</p>
  {% if l.rows %}
  <table class="list" data-list="{{ l.name }}"><thead><tr>{% for c in l.columns %}<th>{{ c }}</th>{% endfor %}</tr></thead><tbody>
  {% for r in l.shown %}<tr>{% for c in l.columns %}<td>{{ r[c] }}</td>{% endfor %}</tr>{% endfor %}
  </tbody></table>
  {% if l.rows|length > l.shown|length %}<p class="more">… and {{ l.rows|length - l.shown|length }} more in {{ l.file }}</p>{% endif %}
  {% else %}<p class="ok">None.</p>{% endif %}
  {% endfor %}
</section>

<section id="funnel">
  <h2>Funnel per week of sending</h2>
  <div class="chart">{{ funnel_svg | safe }}</div>
  <table id="funnel-table"><thead><tr><th>week of</th>{% for s in path %}<th class="n">{{ labels[s] }}</th>{% endfor %}</tr></thead><tbody>
  {% for w in p.funnel %}<tr data-week="{{ w.week }}"><td>{{ w.week }}</td>{% for s in path %}<td class="n">{{ w[s] }}</td>{% endfor %}</tr>{% endfor %}
  </tbody></table>
</section>

<section id="timing">
  <h2>How long each stage takes</h2>
  <div class="chart">{{ timing_svg | safe }}</div>
  <table id="timing-table"><thead><tr><th>stage</th><th class="n">kits</th><th class="n">median (days)</th><th class="n">90th percentile (days)</th></tr></thead><tbody>
  {% for k, t in timing %}<tr data-step="{{ k }}"><td>{{ step_labels[k] }}</td><td class="n">{{ t.count }}</td><td class="n median">{{ fmt(t.median_days) }}</td><td class="n p90">{{ fmt(t.p90_days) }}</td></tr>{% endfor %}
  </tbody></table>
  <h3>Per batch</h3>
  <table id="batch-timing"><thead><tr><th>batch</th><th class="n">kits</th>{% for k, _ in timing %}<th class="n">{{ step_labels[k] }}<br><span class="muted">median / p90 days</span></th>{% endfor %}</tr></thead><tbody>
  {% for b in batches %}<tr data-batch="{{ b.batch_id }}"><td>{{ b.batch_id if b.batch_id is not none else "—" }}</td><td class="n">{{ b.kits }}</td>{% for k, _ in timing %}<td class="n">{{ fmt(b.timing[k].median_days) }} / {{ fmt(b.timing[k].p90_days) }}</td>{% endfor %}</tr>{% endfor %}
  </tbody></table>
</section>

<section id="letters">
  <h2>Results letters (orders with results available): {{ p.letters|length }}</h2>
  <p><a href="{{ letters_href }}">letters.csv</a> · patient letters sent: {{ patient_sent }}, PCP letters sent: {{ pcp_sent }}</p>
  {% if p.letters %}
  <table id="letters-table"><thead><tr>{% for c in letter_columns %}<th>{{ c }}</th>{% endfor %}</tr></thead><tbody>
  {% for r in letters_shown %}<tr>{% for c in letter_columns %}<td>{{ r[c] if r[c] is not none else "not sent" }}</td>{% endfor %}</tr>{% endfor %}
  </tbody></table>
  {% if p.letters|length > letters_shown|length %}<p class="more">… and {{ p.letters|length - letters_shown|length }} more in letters.csv</p>{% endif %}
  {% endif %}
</section>

<footer class="muted">labsync · generated {{ generated }} from the warehouse (views lgc_item_stages, lgc_program_funnel, lgc_stage_turnaround; docs/warehouse.md). Times are LetsGetChecked's timestamps. Dispatched limit {{ p.dispatched_days }} days, lab limit {{ p.lab_days }} days.</footer>
</body>
</html>
"""


@cache
def _template():
    from jinja2 import Environment, StrictUndefined

    env = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(TEMPLATE)


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M")
    return f"{v:g}" if isinstance(v, float) else str(v)


def slug(code: str) -> str:
    """A program code as a folder name (letters, digits, `-`, `_`, `.`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", code).strip("._") or "_"


def _cells(row: dict, columns: Sequence[str]) -> dict:
    return {c: _fmt(row.get(c)) for c in columns}


def render(p: Program) -> str:
    d = p.as_dict()
    lists = []
    for name, columns in LISTS.items():
        rows = p.lists.get(name, [])
        lists.append(dict(name=name, title=LIST_TITLES[name].format(dispatched_days=p.dispatched_days,
                                                                    lab_days=p.lab_days),
                          columns=columns, rows=rows, file=f"{name}.csv", href=quote(f"{name}.csv"),
                          shown=[_cells(r, columns) for r in rows[:MAX_SHOWN]]))
    batches = [{"batch_id": b["batch_id"], "kits": sum(b["stages"].values()), "timing": b["timing"]}
               for b in d["batches"]]
    timing = list(d["timing"].items())
    return _template().render(
        p=p, css=CSS, generated=p.generated_at.strftime("%Y-%m-%d %H:%M UTC"), stages=list(STAGE_LABELS),
        labels=STAGE_LABELS, path=PATH, step_labels=STEP_LABELS, fmt=_fmt, lists=lists, batches=batches,
        timing=timing, person_total=sum(len(v) for v in p.lists.values()),
        stage_svg=charts.stage_bars(p.stages, STAGE_LABELS, "Kits by current stage"),
        funnel_svg=charts.funnel(p.funnel, PATH, STAGE_LABELS),
        timing_svg=charts.timing_bars(d["timing"], STEP_LABELS),
        letter_columns=LETTER_COLUMNS, letters_href=quote("letters.csv"),
        letters_shown=[_cells(r, LETTER_COLUMNS) | {c: r.get(c) and _fmt(r.get(c)) for c in LETTER_COLUMNS[3:]}
                       for r in p.letters[:MAX_SHOWN]],
        patient_sent=sum(1 for r in p.letters if r["patient_letter_sent_at"]),
        pcp_sent=sum(1 for r in p.letters if r["pcp_letter_sent_at"]),
    )


def csv_text(p: Program, name: str) -> str:
    """One list (or `letters`) as the text of a CSV file: BOM, CRLF, formula-safe cells."""
    columns = LETTER_COLUMNS if name == "letters" else LISTS[name]
    rows = p.letters if name == "letters" else p.lists[name]
    buf = io.StringIO()
    buf.write("\ufeff")
    w = open_writer(buf)
    w.writerow(columns)
    w.writerows([["" if r.get(c) is None else (r[c].isoformat() if isinstance(r[c], datetime) else r[c])
                  for c in columns] for r in rows])
    return buf.getvalue()


@dataclass(frozen=True)
class Written:
    program: str
    page: str  # where the page is (a path or URL)
    folder: str  # relative to the inbox
    counts: dict[str, int]  # list name -> rows

    def as_dict(self) -> dict:
        return {"program_code": self.program, "page": self.page, "folder": self.folder, "lists": self.counts}


def write_program(store: Store, p: Program) -> Written:
    folder = f"{FOLDER}/{slug(p.code)}"
    store.ensure(FOLDER, folder)
    for name in (*LISTS, "letters"):
        store.write_text(f"{folder}/{name}.csv", csv_text(p, name))
    page = store.write_text(f"{folder}/index.html", render(p))
    return Written(p.code, page, folder, {k: len(v) for k, v in p.lists.items()})


def open_inbox(settings: Settings) -> Store:
    return open_store(settings.inbox, conn_id=settings.inbox_conn_id)


def write(engine: Engine, settings: Settings, program: str | None = None, *, store: Store | None = None,
          now: datetime | None = None, dispatched_days: int = 14, lab_days: int = 7) -> list[Written]:
    """Build every program's page (or the one named) and store it with its CSVs in the inbox."""
    store = store or open_inbox(settings)
    return [write_program(store, p)
            for p in build(engine, program, now=now, dispatched_days=dispatched_days, lab_days=lab_days)]
