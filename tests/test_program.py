"""The program's view (issue 25): a few hundred sandbox orders moved through the lifecycle at
chosen times (the sandbox's clock pinned), tracked by the real tracker, then every count, median,
percentile and list on the program page, in its JSON, its CSVs and the SQL views checked against
values the test computes from its own schedule. On SQLite and PostgreSQL."""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl.intake.csvsafe import read_rows
from etl.orders import lifecycle, programs, results
from etl.orders.load import load_rows
from etl.program import page, report
from etl.warehouse.tables import lgc_order_programs, lgc_orders, lgc_outbox
from tests.lifecycle_support import lgc, quick, run  # noqa: F401  (run: the CLI fixture)
from tests.test_lgc_support import order_row

BASE = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)  # a Monday
DAY, HOUR = timedelta(days=1), timedelta(hours=1)
N_ALPHA, N_BETA = 216, 24
NOW = BASE + timedelta(days=60)
PATH = ("accepted", "kit_dispatched", "registered", "at_lab", "results_available")
SANDBOX = {"accepted": "Created", "kit_dispatched": "KitDispatched", "registered": "KitRegistered",
           "at_lab": "KitArrivedAtLab", "results_available": "ResultsAvailable"}


def _fate(i: int) -> str:
    """Where order i ends: the stage it stops at (cancelled / failed too)."""
    return ("accepted", "kit_dispatched", "kit_dispatched", "registered", "registered", "at_lab",
            "results_available", "results_available", "results_available", "cancelled", "failed",
            "results_available")[i % 12]


def _schedule(i: int) -> dict[str, datetime]:
    """When order i is sent and reaches each stage on its way (chosen delays)."""
    sent = BASE + (i % 4) * 7 * DAY + (i % 7) * HOUR  # four weeks of sending
    times = {"sent": sent}
    fate = _fate(i)
    if fate == "failed":
        times["failed"] = sent + 2 * HOUR
        return times
    delays = {"accepted": DAY + (i % 3) * HOUR, "kit_dispatched": (1 + i % 4) * DAY,
              "registered": (2 + i % 9) * DAY, "at_lab": (1 + i % 5) * DAY + (i % 2) * 12 * HOUR,
              "results_available": (1 + i % 3) * DAY}
    if fate == "cancelled":  # cancelled a few hours after LetsGetChecked accepted it
        times["accepted"] = sent + delays["accepted"]
        times["cancelled"] = times["accepted"] + 3 * HOUR
        return times
    at = sent
    for stage in PATH:
        at = at + delays[stage]
        times[stage] = at
        if stage == fate:
            break
    # stuck kits: most dispatched / registered long ago; a few recently (not late yet)
    if fate == "kit_dispatched" and i % 24 == 2:
        times["kit_dispatched"] = NOW - 3 * DAY - (i % 5) * HOUR
    if fate == "registered" and i % 24 == 4:
        times["registered"] = NOW - 2 * DAY - (i % 5) * HOUR
    return times


def _expected_stage(i: int) -> str:
    return _fate(i)


def _p90(values):
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


@pytest.fixture
def moved(engine, settings, sandbox):
    """240 orders (216 of program Alpha, 24 of Beta, one kit each), moved as scheduled and
    tracked after each round, so every transition's vendor timestamp is in the history."""
    s = quick(settings)
    life = lgc(sandbox).lifecycle
    n = N_ALPHA + N_BETA
    sched = {i: _schedule(i) for i in range(n)}
    coid = {i: f"ORD-{i:05d}" for i in range(n)}
    # send: the sandbox's clock says when (items' createdAt)
    by_sent: dict[datetime, list[int]] = defaultdict(list)
    for i in range(n):
        by_sent[sched[i]["sent"]].append(i)
    for when in sorted(by_sent):
        life.set_clock(when)
        rows = [order_row(i, order_items="GLCS", program_code="Alpha" if i < N_ALPHA else "Beta")
                for i in by_sent[when]]
        assert dict(load_rows(engine, s, rows).counts) == {"accepted": len(rows)}
    # move, one stage per round, each transition at its chosen time; then track everything
    for k, stage in enumerate(("accepted", "kit_dispatched", "registered", "at_lab", "results_available")):
        for i in range(n):
            t = sched[i]
            if k == 0 and "failed" in t:
                life.set_clock(t["failed"])
                life.advance(coid[i], to="ValidationFailed")
            elif stage in t:
                life.set_clock(t[stage])
                life.advance(coid[i], steps=1)
            if k == 1 and "cancelled" in t:  # cancel after Created, applied at its time
                item = life.item(coid[i])
                assert life.cancel(coid[i], item.id)[0] == 202
                life.set_clock(t["cancelled"])
                life.advance(coid[i])
        summary = lifecycle.track(engine, s, [coid[i] for i in range(n)])
        assert not summary.failed and not summary.not_found
    life.set_clock(None)
    # store the results of half the kits with results (the others: "available but not stored")
    stored = set()
    cands = {c.client_order_id: c for c in results.candidates(engine)}
    for i in range(n):
        if _fate(i) == "results_available" and i % 2 == 0:
            results.store_result(engine, cands[coid[i]], b'{"testResults": []}', None)
            stored.add(i)
    # two orders of Alpha the ledger holds unconfirmed / whose row gave up
    now = datetime.now(UTC)
    with engine.begin() as conn:
        programs.record(conn, [dict(client_order_id=c, program_code="Alpha", participant_id=f"P-{c}",
                                    batch_id=None, recorded_at=now) for c in ("ORD-U1", "ORD-G1")])
        conn.execute(sa.insert(lgc_orders), [
            dict(client_order_id="ORD-U1", state="unconfirmed", attempts=1, payload_sha256="0" * 64,
                 created_at=now, updated_at=now),
            dict(client_order_id="ORD-G1", state="failed", attempts=5, last_error="HTTP 503",
                 payload_sha256="1" * 64, created_at=now, updated_at=now)])
        batch = conn.execute(sa.select(lgc_outbox.c.batch_id).limit(1)).scalar_one()
        conn.execute(sa.insert(lgc_outbox), [dict(batch_id=batch, line=999, client_order_id="ORD-G1", body=None,
                                                  body_sha256="1" * 64, outcome="given_up", attempts=5,
                                                  last_error="HTTP 503", created_at=now, updated_at=now)])
    return dict(sched=sched, coid=coid, stored=stored, n=n, settings=s)


def _alpha(moved):
    return [i for i in range(moved["n"]) if i < N_ALPHA]


def test_counts_timings_and_lists_match_the_schedule(engine, moved, tmp_path):
    sched, coid, stored = moved["sched"], moved["coid"], moved["stored"]
    ids = _alpha(moved)
    [alpha] = report.build(engine, "Alpha", now=NOW)
    # stages: one kit per order, so kits and orders agree
    want = Counter(_expected_stage(i) for i in ids)
    assert alpha.stages == {s: want.get(s, 0) for s in report.STAGES}
    # orders: the same, plus the two the ledger holds without any item (sent, not tracked)
    assert alpha.order_stages == {**alpha.stages, "sent": alpha.stages["sent"] + 2}
    assert alpha.items == len(ids) and alpha.orders == len(ids) + 2
    # funnel per week of sending
    weeks: dict[str, Counter] = defaultdict(Counter)
    for i in ids:
        wk = (sched[i]["sent"].date() - timedelta(days=sched[i]["sent"].weekday())).isoformat()
        weeks[wk]["sent"] += 1
        for s in PATH:
            if s in sched[i]:
                weeks[wk][s] += 1
        if "cancelled" in sched[i]:
            pass  # cancelled after accepted: counted as accepted only
    assert [w["week"] for w in alpha.funnel] == sorted(weeks)
    for w in alpha.funnel:
        assert {s: w[s] for s in ("sent", *PATH)} == {s: weeks[w["week"]].get(s, 0) for s in ("sent", *PATH)}
    # medians and 90th percentiles per stage
    steps = {"accepted": ("sent", "accepted"), "kit_dispatched": ("accepted", "kit_dispatched"),
             "registered": ("kit_dispatched", "registered"), "at_lab": ("registered", "at_lab"),
             "results_available": ("at_lab", "results_available"),
             "sent_to_results": ("sent", "results_available")}
    for name, (a, b) in steps.items():
        spans = [(sched[i][b] - sched[i][a]).total_seconds() for i in ids if a in sched[i] and b in sched[i]]
        t = alpha.timing[name]
        assert t.count == len(spans) and spans, name
        assert t.median_seconds == pytest.approx(statistics.median(spans)), name
        assert t.p90_seconds == pytest.approx(_p90(spans)), name
    # per batch (one batch per sending time here): the same, over the batch's orders
    with engine.connect() as conn:
        batch_of = dict(conn.execute(sa.select(lgc_orders.c.client_order_id, lgc_orders.c.batch_id)).all())
    by_batch = defaultdict(list)
    for i in ids:
        by_batch[batch_of[coid[i]]].append(i)
    assert set(alpha.batch_timing) == set(by_batch)
    for b, members in by_batch.items():
        assert sum(alpha.batch_stages[b].values()) == len(members)
        for name, (a, z) in steps.items():
            spans = [(sched[i][z] - sched[i][a]).total_seconds() for i in members if a in sched[i] and z in sched[i]]
            t = alpha.batch_timing[b][name]
            assert t.count == len(spans)
            assert t.median_seconds == (pytest.approx(statistics.median(spans)) if spans else None)
            assert t.p90_seconds == (pytest.approx(_p90(spans)) if spans else None)
    # needs a person
    late_dispatch = sorted(coid[i] for i in ids if _fate(i) == "kit_dispatched"
                           and NOW - sched[i]["kit_dispatched"] > 14 * DAY)
    late_lab = sorted(coid[i] for i in ids if _fate(i) == "registered" and NOW - sched[i]["registered"] > 7 * DAY)
    not_stored = sorted(coid[i] for i in ids if _fate(i) == "results_available" and i not in stored)
    assert late_dispatch and late_lab and not_stored  # the scenario has some of each
    assert len(late_dispatch) < sum(1 for i in ids if _fate(i) == "kit_dispatched")  # and some not late
    assert [r["client_order_id"] for r in alpha.lists["not_registered"]] == late_dispatch
    assert [r["client_order_id"] for r in alpha.lists["not_at_lab"]] == late_lab
    assert [r["client_order_id"] for r in alpha.lists["results_not_stored"]] == not_stored
    assert [(r["client_order_id"], r["state"]) for r in alpha.lists["unconfirmed_or_given_up"]] == [
        ("ORD-G1", "given_up"), ("ORD-U1", "unconfirmed")]
    for r in alpha.lists["not_registered"]:
        i = int(r["client_order_id"][4:])
        assert r["participant_id"] == f"P{i:05d}"
        assert r["kit_dispatched_at"] == sched[i]["kit_dispatched"]
        assert r["days_waiting"] == round((NOW - sched[i]["kit_dispatched"]).total_seconds() / 86400, 1)
    # Beta is separate
    [beta] = report.build(engine, "Beta", now=NOW)
    assert beta.items == N_BETA
    assert beta.stages == {s: Counter(_expected_stage(i) for i in range(N_ALPHA, moved["n"])).get(s, 0)
                           for s in report.STAGES}
    assert report.programs(engine) == ["Alpha", "Beta"]


def test_the_views_agree_with_the_schedule(engine, moved):
    sched, coid = moved["sched"], moved["coid"]
    with engine.connect() as conn:
        stages = {r.client_order_id: r for r in conn.execute(sa.text("SELECT * FROM lgc_item_stages"))}
        funnel = {(r.program_code, r.batch_id): r for r in conn.execute(sa.text("SELECT * FROM lgc_program_funnel"))}
        turn = list(conn.execute(sa.text("SELECT item_id, client_order_id, stage, seconds FROM lgc_stage_turnaround")))
    assert len(stages) == moved["n"]
    for i in range(moved["n"]):
        r = stages[coid[i]]
        assert r.stage == _expected_stage(i)
        assert r.program_code == ("Alpha" if i < N_ALPHA else "Beta")
        assert r.participant_id == f"P{i:05d}"
    for prog, ids in (("Alpha", range(N_ALPHA)), ("Beta", range(N_ALPHA, moved["n"]))):
        rows = [v for (p, _), v in funnel.items() if p == prog]
        assert sum(r.sent for r in rows) == len(ids)
        for s in PATH:
            assert sum(getattr(r, s) for r in rows) == sum(1 for i in ids if s in sched[i]), (prog, s)
        assert sum(r.cancelled for r in rows) == sum(1 for i in ids if _fate(i) == "cancelled")
        assert sum(r.failed for r in rows) == sum(1 for i in ids if _fate(i) == "failed")
    by = defaultdict(list)
    for r in turn:
        by[r.stage].append((r.client_order_id, float(r.seconds)))
    for name, (a, b) in {"registered": ("kit_dispatched", "registered"),
                         "sent_to_results": ("sent", "results_available")}.items():
        want = sorted((coid[i], (sched[i][b] - sched[i][a]).total_seconds())
                      for i in range(moved["n"]) if a in sched[i] and b in sched[i])
        got = sorted(by[name])
        assert [c for c, _ in got] == [c for c, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=0.01)


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tiles: dict[str, str] = {}
        self.counts: dict[str, str] = {}
        self._tile = self._h3 = None
        self._in_n = False
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and a.get("data-stage"):
            self._tile = a["data-stage"]
        if tag == "span" and a.get("class") == "n" and self._tile:
            self._in_n = True
        if tag == "h3" and a.get("id"):
            self._h3 = a["id"]
        if tag == "span" and a.get("class") == "count" and self._h3:
            self._in_n = True

    def handle_data(self, data):
        self.text.append(data)
        if self._in_n and self._tile:
            self.tiles[self._tile] = data.replace(",", "")
            self._in_n, self._tile = False, None
        elif self._in_n and self._h3:
            self.counts[self._h3] = data
            self._in_n, self._h3 = False, None


def test_the_page_and_its_csvs_show_the_same_numbers(engine, moved, tmp_path):
    s = moved["settings"]
    [w] = page.write(engine, s, "Alpha", now=NOW)
    folder = Path(s.inbox) / "programs" / "Alpha"
    html = (folder / "index.html").read_text(encoding="utf-8")
    assert w.page.endswith("index.html")
    [alpha] = report.build(engine, "Alpha", now=NOW)
    cells = _Cells()
    cells.feed(html)
    assert cells.tiles == {k: str(v) for k, v in alpha.stages.items()}
    assert cells.counts == {k: str(len(v)) for k, v in alpha.lists.items()}
    assert html.count("<svg") == 3 and "<script" not in html
    assert "Ada" not in html and "Lovelace" not in html and "1961" not in html  # no PHI
    for name, rows in alpha.lists.items():
        raw = (folder / f"{name}.csv").read_bytes()
        assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw
        got = list(read_rows(folder / f"{name}.csv"))
        assert [r["client_order_id"] for r in got] == [r["client_order_id"] for r in rows]
    got = list(read_rows(folder / "not_registered.csv"))
    assert list(got[0]) == list(report.LISTS["not_registered"])
    i = int(got[0]["client_order_id"][4:])
    assert got[0]["participant_id"] == f"P{i:05d}"
    assert datetime.fromisoformat(got[0]["kit_dispatched_at"]) == moved["sched"][i]["kit_dispatched"]


def test_a_formula_in_a_participant_id_is_defused_in_the_csv(engine, tmp_path):
    now = datetime.now(UTC)
    with engine.begin() as conn:
        programs.record(conn, [dict(client_order_id="ORD-X", program_code="Z", participant_id="=HYPERLINK(1)",
                                    batch_id=None, recorded_at=now)])
        conn.execute(sa.insert(lgc_orders), [dict(client_order_id="ORD-X", state="unconfirmed", attempts=1,
                                                  payload_sha256="0" * 64, created_at=now, updated_at=now)])
    [z] = report.build(engine, "Z")
    text = page.csv_text(z, "unconfirmed_or_given_up")
    assert text.startswith("\ufeffclient_order_id,participant_id,")
    assert text.splitlines()[1].split(",")[:2] == ["ORD-X", "'=HYPERLINK(1)"]
    with engine.connect() as conn:
        assert conn.execute(sa.select(lgc_order_programs.c.program_code)).scalars().all() == ["Z"]


SHOTS = Path(__file__).resolve().parent.parent / ".labsync" / "screenshots"


def test_the_page_in_headless_chromium_reads_at_a_glance_and_prints(engine, moved, warehouse_url):
    from tests.browser import chromium, screenshot, wait_for_element

    [w] = page.write(engine, moved["settings"], "Alpha", now=NOW)
    [alpha] = report.build(engine, "Alpha", now=NOW)
    kind = "postgres" if warehouse_url.startswith("postgresql") else "sqlite"
    with chromium(height=2400) as browser:
        browser.get(Path(w.page).as_uri())
        headline = wait_for_element(browser, "#headline").text
        tiles = {e.get_attribute("data-stage"): e.find_element("css selector", ".n").text
                 for e in browser.find_elements("css selector", ".tile")}
        charts = browser.find_elements("css selector", ".chart svg")
        sizes = [(c.size["width"], c.size["height"]) for c in charts]
        counts = {e.get_attribute("id"): e.find_element("css selector", ".count").text
                  for e in browser.find_elements("css selector", "#attention h3")}
        shot = screenshot(browser, SHOTS / f"program_page_{kind}.png")
        pdf = browser.execute_cdp_cmd("Page.printToPDF", {"printBackground": True})
    assert headline == f"Alpha: {alpha.orders} orders, {alpha.items} kits (order items)"
    assert tiles == {k: f"{v:,}" for k, v in alpha.stages.items()}
    assert counts == {k: str(len(v)) for k, v in alpha.lists.items()}
    assert len(sizes) == 3 and all(wd > 300 and ht > 100 for wd, ht in sizes)  # drawn, not empty
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pdf["data"]) > 1000  # it prints


def test_labsync_program_json_prints_the_numbers_of_the_page(engine, moved, run, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LABSYNC_INBOX", str(moved["settings"].inbox))
    code, out, err = run("program", "Alpha", "--json")
    assert code == 0, err
    import json

    doc = json.loads(out)
    [p] = doc["programs"]
    [alpha] = report.build(engine, "Alpha")  # the CLI's now: real time, so every late kit is late
    assert p["stages"] == alpha.stages and p["order_stages"] == alpha.order_stages
    assert {k: [r["client_order_id"] for r in v] for k, v in p["lists"].items()} == {
        k: [r["client_order_id"] for r in v] for k, v in alpha.lists.items()}
    assert p["timing"]["registered"]["median_seconds"] == alpha.timing["registered"].median_seconds
    assert p["page"].endswith("index.html") and Path(p["page"]).is_file()
    code, out, err = run("program", "Nope")
    assert code == 1 and "no order of program 'Nope'" in err
    code, out, err = run("program", "--no-write")
    assert code == 0 and f"Alpha: {alpha.orders} orders, {alpha.items} kits" in out
    assert f"Beta: {N_BETA} orders, {N_BETA} kits" in out


def test_docs_describe_every_table_column_and_view_and_dbt_sources_name_them():
    import yaml

    from etl.warehouse.tables import metadata

    repo = Path(__file__).resolve().parent.parent
    doc = (repo / "docs" / "warehouse.md").read_text(encoding="utf-8")
    sections = {part.split("`", 1)[0]: part for part in doc.split("### `")[1:]}
    views = ("lgc_item_stages", "lgc_program_funnel", "lgc_stage_turnaround")
    assert set(sections) == set(metadata.tables) | set(views)
    for name, table in metadata.tables.items():
        for column in table.columns:
            assert f"| `{column.name}` |" in sections[name], f"docs/warehouse.md: {name}.{column.name}"
        assert "PHI:" in sections[name]
    sources = yaml.safe_load((repo / "docs" / "dbt" / "sources.yml").read_text())["sources"][0]["tables"]
    named = {t["name"]: t for t in sources}
    assert set(named) == set(metadata.tables) | set(views)
    fresh = {n: t for n, t in named.items() if "freshness" in t}
    assert {"lgc_order_items", "lgc_item_status_history", "lgc_outreach_letters", "webhook_events"} <= set(fresh)
    for n, t in fresh.items():
        assert t["loaded_at_field"] in metadata.tables[n].columns, n


def test_the_views_have_the_documented_columns(engine):
    repo = Path(__file__).resolve().parent.parent
    doc = (repo / "docs" / "warehouse.md").read_text(encoding="utf-8")
    with engine.connect() as conn:
        for view in ("lgc_item_stages", "lgc_program_funnel", "lgc_stage_turnaround"):
            columns = list(conn.execute(sa.text(f"SELECT * FROM {view} WHERE 1 = 0")).keys())
            section = doc.split(f"### `{view}`", 1)[1].split("### `", 1)[0]
            for c in columns:
                assert f"`{c}`" in section, (view, c)


def test_an_order_is_at_the_stage_of_its_least_advanced_kit_on_the_way():
    assert report.order_stage(["results_available", "registered", "cancelled"]) == "registered"
    assert report.order_stage(["cancelled", "failed"]) == "cancelled"
    assert report.order_stage(["failed"]) == "failed"
    assert report.percentile([5, 1, 4, 2, 3, 6, 7, 8, 9, 10], 90) == 9
    assert report.median([1, 2, 3, 10]) == 2.5


def test_a_program_with_nothing_tracked_yet_still_renders(engine):
    now = datetime.now(UTC)
    with engine.begin() as conn:
        programs.record(conn, [dict(client_order_id="ORD-N", program_code="New", participant_id="P-N",
                                    batch_id=None, recorded_at=now)])
        conn.execute(sa.insert(lgc_orders), [dict(client_order_id="ORD-N", state="accepted", attempts=1,
                                                  payload_sha256="0" * 64, created_at=now, updated_at=now)])
    [p] = report.build(engine, "New")
    assert p.items == 0 and p.orders == 1 and p.order_stages["sent"] == 1 and p.funnel == []
    html = page.render(p)
    assert html.count("<svg") == 3 and "New: 1 orders, 0 kits" in html
