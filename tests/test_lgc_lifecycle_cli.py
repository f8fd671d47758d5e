"""`labsync track`, `results`, `cancel`, `lifecycle` and the item statuses in `labsync status`
and the batch summary, run in-process against the sandbox (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

from etl.intake import summary
from tests.lifecycle_support import lgc, place_orders, quick, receiver, run, send_webhooks_to

__all__ = ["run"]  # the in-process CLI fixture


def test_track_results_and_status_from_the_command_line(run, engine, settings, sandbox):
    a, b = place_orders(engine, quick(settings), 2)
    code, out, err = run("track")
    assert code == 0, err
    assert "tracked 2 of 2 orders" in out and "items: Submitted 4" in out

    sb = lgc(sandbox).lifecycle
    sb.advance(a, to="ResultsAvailable")
    sb.advance(b, steps=2)
    code, out, _ = run("track", a, "--json")
    data = json.loads(out)
    assert code == 0 and (data["checked"], data["statuses"]) == (1, {"ResultsAvailable": 2})
    code, out, _ = run("track", "--batch", "nope.csv")
    assert code == 1
    code, out, _ = run("track")  # both were checked a moment ago: nothing is due
    assert code == 0 and "no open order unchecked for 60 minutes" in out and "--all" in out
    code, out, _ = run("track", "--all")  # a person's "refresh now"
    assert code == 0 and "tracked 1 of 1 orders" in out and "KitDispatched 2" in out

    code, out, _ = run("results")
    assert code == 0 and out.startswith("results: 2 stored (3 values)")
    code, out, _ = run("results")
    assert code == 0 and "nothing due" in out

    code, out, _ = run("status", "--batch", "nope")
    assert code == 1
    code, out, _ = run("status", a)
    assert code == 0 and "item statuses" in out.replace("\n", " ").replace("│", " ")
    code, out, _ = run("status", b, "--json")
    row = json.loads(out)
    assert {i["status"] for i in row["items"]} == {"KitDispatched"}
    assert all(i["outbound_tracking"] for i in row["items"])
    code, out, _ = run("status")
    assert code == 0 and "items: KitDispatched 2, ResultsAvailable 2" in out

    code, out, err = run("track", "NOT-AN-ORDER")
    assert code == 1 and "NOT-AN-ORDER: LetsGetChecked does not know this order" in err


def test_cancel_from_the_command_line(run, engine, settings, sandbox):
    a, b = place_orders(engine, quick(settings), 2)
    sb = lgc(sandbox).lifecycle
    sb.advance(b, to="KitArrivedAtLab")

    code, out, err = run("cancel", a, "--item", "GLCS")
    assert code == 0 and "cancel requested" in out
    code, out, err = run("cancel", b)
    assert code == 1 and err.count("not cancelled: the item is KitArrivedAtLab") == 2
    assert lgc(sandbox).patch_count == {a: 1}
    code, _, err = run("cancel", "NO-SUCH-ORDER")
    assert code == 2 and "does not know order 'NO-SUCH-ORDER'" in err
    code, _, err = run("cancel", a, "--item", "ZZZ")
    assert code == 2 and "has no item 'ZZZ'" in err

    def statuses() -> dict:
        code, out, _ = run("status", a, "--json")
        return {i["code"]: (i["status"], i["cancel_state"]) for i in json.loads(out)["items"]}

    assert statuses() == {"GLCS": ("Submitted", "cancel requested"), "FCIT": ("Submitted", None)}
    sb.advance(a)
    run("track", a)
    assert statuses() == {"GLCS": ("Cancelled", "cancelled"), "FCIT": ("Created", None)}


def test_labsync_lifecycle_does_what_the_dag_does_once(run, engine, settings, sandbox):
    (coid,) = place_orders(engine, quick(settings), 1)
    sb = lgc(sandbox).lifecycle
    with receiver(engine) as rx:
        send_webhooks_to(sandbox, rx)
        sb.advance(coid, to="ResultsAvailable")
        assert sb.wait_idle()
    code, out, err = run("lifecycle")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("webhooks: 12 events, 12 applied, 0 ignored, 0 failed; 1 orders confirmed")
    assert lines[1] == "sweep: no open order is due"
    assert lines[2].startswith("results: 2 stored (3 values)")


def test_the_batch_summary_shows_each_orders_item_statuses():
    page = summary.render(
        file_name="b.csv", outcome="ok", counts={"accepted": 2},
        accepted=[{"line": 2, "client_order_id": "A", "order_item_ids": [{"code": "GLCS", "id": "i1"}]},
                  {"line": 3, "client_order_id": "B", "order_item_ids": [{"code": "GLCS", "id": "i2"}]}],
        item_statuses={"A": [{"item_id": "i1", "code": "GLCS", "status": "KitDispatched",
                              "cancel_state": "cancel requested"}]})
    assert "<th>item statuses</th>" in page
    assert "GLCS: KitDispatched (cancel requested)" in page and "not tracked yet" in page
