"""LetsGetChecked after the PUT, against the sandbox over real HTTP and a real warehouse (SQLite
and PostgreSQL): every status and transition, barcodes and tracking, the ordering rule, the
sweep, cancellation, two trackers at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import sqlalchemy as sa

from etl import warehouse
from etl.errors import UnusableInputError
from etl.lgc.orders_api import get_order, open_session, parse_order, status_code
from etl.orders import lifecycle
from etl.orders.lifecycle import Observation, apply_observations, cancel, open_orders, track
from etl.states import CancelState, ItemStatus, StatusSource
from etl.warehouse.tables import lgc_order_items, lgc_orders
from tests.lifecycle_support import (
    history,
    items,
    lgc,
    place_orders,
    quick,
    receiver,
    send_webhooks_to,
)
from tests.pgserver import wait_for

PATH = [ItemStatus.CREATED, ItemStatus.KIT_DISPATCHED, ItemStatus.KIT_REGISTERED,
        ItemStatus.KIT_ARRIVED_AT_LAB, ItemStatus.RESULTS_AVAILABLE]


def _aware(ts):
    return ts.replace(tzinfo=UTC) if ts is not None and ts.tzinfo is None else ts


def _by_code(engine, coid: str) -> dict[str, dict]:
    return {r["code"]: r for r in items(engine).values() if r["client_order_id"] == coid}


# ---- the lifecycle, step by step -----------------------------------------------------------------

def test_every_status_and_transition_is_tracked_with_barcodes_and_tracking(engine, settings, sandbox):
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    sb = lgc(sandbox).lifecycle
    first = track(engine, s)
    assert (first.orders, first.checked, first.statuses) == (1, 1, {"Submitted": 2})
    placed = {i["id"] for i in lgc(sandbox).orders[coid]["response"]["orderItems"]}
    assert set(items(engine)) == placed

    for n, status in enumerate(PATH):
        sb.advance(coid)  # one step for both items
        assert track(engine, s).statuses == {status: 2}
        for item_id, row in items(engine).items():
            truth = sb.item(coid, item_id)
            assert row["status"] == status == truth.status
            assert _aware(row["status_at"]) == truth.updated_at and row["status_source"] == "poll"
            dispatched, registered, at_lab = n >= 1, n >= 2, n >= 3
            assert (row["outbound_tracking"] is not None) == dispatched
            assert row["outbound_tracking"] == truth.outbound
            assert (row["barcode"] is not None) == registered
            assert row["barcode"] == truth.barcode and row["alpha_code"] == truth.alpha_code
            if registered:
                assert row["barcode"].startswith("LGC-") and len(row["alpha_code"]) == 6
            assert (row["inbound_tracking"] is not None) == at_lab == (truth.inbound is not None)

    for item_id in placed:
        h = history(engine, item_id)
        assert [r["status"] for r in h] == ["Submitted", *PATH]
        assert [r["previous_status"] for r in h] == [None, "Submitted", *PATH[:-1]]
        assert {r["source"] for r in h} == {"poll"} and all(r["applied"] for r in h)
    assert open_orders(engine) == []  # final: nothing left to ask about
    assert track(engine, s).orders == 0


def test_validation_failed_is_final_and_only_open_items_keep_an_order_tracked(engine, settings, sandbox):
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    sb = lgc(sandbox).lifecycle
    first, second = (i.id for i in sb.orders[coid].items)
    assert sb.advance(coid, first, to="ValidationFailed")[0]["status"] == "ValidationFailed"
    assert sb.advance(coid, first) == []  # a final status never moves
    track(engine, s)
    got = items(engine)
    assert got[first]["status"] == ItemStatus.VALIDATION_FAILED and got[second]["status"] == "Submitted"
    assert open_orders(engine) == [coid]  # the other item is still open
    sb.advance(coid, second, steps=2)
    assert sb.advance(coid, second, to="ValidationFailed") == []  # only from Submitted
    sb.advance(coid, second, to="ResultsAvailable")
    track(engine, s)
    assert open_orders(engine) == []


def test_the_sandbox_moves_items_on_by_itself_with_time(engine, settings, sandbox):
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    lgc(sandbox).lifecycle.configure(auto_step_seconds=0.02)
    assert wait_for(lambda: track(engine, s, [coid]).statuses == {"ResultsAvailable": 2}, timeout=60)
    assert all(r["barcode"] and r["inbound_tracking"] for r in items(engine).values())


def test_open_orders_are_those_letsgetchecked_holds_with_an_open_or_unknown_item(engine, settings, sandbox):
    s = quick(settings)
    a, b, c = place_orders(engine, s, 3)
    with engine.begin() as conn:  # a rejected order: LetsGetChecked holds nothing to track
        conn.execute(sa.update(lgc_orders).where(lgc_orders.c.client_order_id == c).values(state="rejected"))
    assert open_orders(engine) == [a, b]  # never looked at yet
    lgc(sandbox).lifecycle.advance(a, to="ResultsAvailable")
    track(engine, s)
    assert open_orders(engine) == [b]
    old = datetime.now(UTC) - timedelta(hours=2)
    assert open_orders(engine, stale_before=old) == []  # b was checked just now
    with engine.begin() as conn:
        conn.execute(sa.update(lgc_order_items).values(last_checked_at=old - timedelta(minutes=1)))
    assert open_orders(engine, stale_before=old) == [b]  # ...and a is final, however stale
    assert open_orders(engine, batch_ids=[12345]) == []


def test_a_webhook_lost_for_good_is_caught_by_the_sweep(engine, settings, sandbox):
    s = quick(settings)
    sb = lgc(sandbox).lifecycle
    with receiver(engine) as rx:
        send_webhooks_to(sandbox, rx)
        (coid,) = place_orders(engine, s, 1)
        sb.advance(coid)
        assert sb.wait_idle()
        assert lifecycle.apply_webhooks(engine, s).applied == 2
        assert {r["status"] for r in items(engine).values()} == {"Created"}

        sb.configure(drop=2)  # LetsGetChecked gives up on both KitDispatched events
        sb.advance(coid)
        assert sb.wait_idle() and sb.lost == 2
        assert lifecycle.apply_webhooks(engine, s).events == 0
        assert {r["status"] for r in items(engine).values()} == {"Created"}

    stale = s.lifecycle.stale_after
    assert track(engine, s, stale_after=stale).orders == 0  # checked recently: not due yet
    with engine.begin() as conn:  # an hour and more later
        conn.execute(sa.update(lgc_order_items).values(
            last_checked_at=datetime.now(UTC) - timedelta(seconds=stale + 60)))
    swept = track(engine, s, stale_after=stale)
    assert (swept.orders, swept.checked, swept.statuses) == (1, 1, {"KitDispatched": 2})
    for item_id, row in items(engine).items():
        assert row["outbound_tracking"] == sb.item(coid, item_id).outbound
        assert history(engine, item_id)[-1]["source"] == "poll"


def test_two_trackers_at_once_record_each_change_once(engine, settings, sandbox):
    s = quick(settings)
    coids = place_orders(engine, s, 30)
    lgc(sandbox).lifecycle.advance(steps=3)
    with ThreadPoolExecutor(2) as pool:
        runs = [f.result() for f in [pool.submit(track, engine, s) for _ in range(2)]]
    assert [(r.checked, r.failed, r.not_found) for r in runs] == [(30, {}, []), (30, {}, [])]
    got = items(engine)
    assert len(got) == 60 and {r["status"] for r in got.values()} == {"KitRegistered"}
    assert sorted(r["item_id"] for r in history(engine)) == sorted(got)  # one row per item
    assert sum(lgc(sandbox).get_count[c] for c in coids) == 60


def test_a_vendor_failure_is_counted_per_order_and_the_rest_is_kept(engine, settings, sandbox):
    s = quick(settings)
    a, b = place_orders(engine, s, 2)
    lgc(sandbox).faults.update(error_rate=1.0, exempt_paths=["/lgc/oauth2"])  # every GET: 500/503
    failed = track(engine, s)
    assert failed.checked == 0 and set(failed.failed) == {a, b} and failed.exit_code == 1
    assert "HTTP 50" in failed.failed[a] and items(engine) == {}
    lgc(sandbox).faults.reset()
    ok = track(engine, s, [a, b, "NOT-AN-ORDER"])
    assert ok.checked == 2 and ok.not_found == ["NOT-AN-ORDER"] and ok.exit_code == 1


# ---- the ordering rule (real SQL, both warehouses) ----------------------------------------------

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def obs(status: str, minute: int | None, source: StatusSource = StatusSource.WEBHOOK, item: str = "item-1"):
    at = None if minute is None else T0 + timedelta(minutes=minute)
    checked = T0 + timedelta(minutes=minute or 0, seconds=30) if source == StatusSource.POLL else None
    return Observation(item, "ORD-RULE", status, at, source, checked_at=checked)


def _row(engine, item="item-1") -> dict:
    return items(engine)[item]


def test_reordered_webhooks_leave_the_newest_status_and_keep_the_late_one_in_history(engine):
    apply_observations(engine, [obs("KitRegistered", 2)])
    late = apply_observations(engine, [obs("KitDispatched", 1)])  # sent first, arrived last
    assert (late.changed, late.ignored, late.history) == (0, 1, 1)
    row = _row(engine)
    assert row["status"] == "KitRegistered" and _aware(row["status_at"]) == T0 + timedelta(minutes=2)
    h = history(engine)
    assert [(r["status"], r["previous_status"], r["applied"]) for r in h] == [
        ("KitRegistered", None, True), ("KitDispatched", "KitRegistered", False)]
    assert _aware(h[1]["vendor_timestamp"]) == T0 + timedelta(minutes=1)


def test_duplicated_webhooks_change_nothing_the_second_time(engine):
    for _ in range(3):
        apply_observations(engine, [obs("Created", 1), obs("Created", 1)])
    assert len(history(engine)) == 1 and _row(engine)["status"] == "Created"


def test_a_poll_settles_a_conflict_with_a_webhook_and_newer_webhooks_still_win(engine):
    apply_observations(engine, [obs("ResultsAvailable", 5)])
    apply_observations(engine, [obs("KitRegistered", 3, StatusSource.POLL)])  # the vendor's answer
    row = _row(engine)
    assert (row["status"], row["status_source"]) == ("KitRegistered", "poll")
    apply_observations(engine, [obs("KitRegistered", 2)])  # an old webhook: ignored
    assert _row(engine)["status_source"] == "poll"
    apply_observations(engine, [obs("KitArrivedAtLab", 4)])  # news: newer than the poll
    assert (_row(engine)["status"], _row(engine)["status_source"]) == ("KitArrivedAtLab", "webhook")


def test_of_two_polls_whose_answers_cross_the_newer_wins(engine):
    apply_observations(engine, [obs("KitRegistered", 3, StatusSource.POLL)])
    apply_observations(engine, [obs("KitDispatched", 2, StatusSource.POLL)])
    row = _row(engine)
    assert row["status"] == "KitRegistered"
    assert _aware(row["last_checked_at"]) == T0 + timedelta(minutes=3, seconds=30)  # the latest check


def test_an_undated_webhook_only_fills_a_status_not_yet_known(engine):
    apply_observations(engine, [obs("Created", None)])
    assert _row(engine)["status"] == "Created"
    apply_observations(engine, [obs("KitDispatched", None)])
    assert _row(engine)["status"] == "Created"


def test_a_cancel_request_is_confirmed_or_overtaken_by_later_statuses(engine):
    apply_observations(engine, [obs("KitRegistered", 1, item="a"), obs("KitRegistered", 1, item="b")])
    with engine.begin() as conn:
        conn.execute(sa.update(lgc_order_items).values(cancel_state=CancelState.REQUESTED))
    apply_observations(engine, [obs("Cancelled", 2, StatusSource.POLL, item="a"),
                                obs("KitArrivedAtLab", 2, StatusSource.POLL, item="b")])
    got = items(engine)
    assert got["a"]["cancel_state"] == CancelState.CONFIRMED
    assert got["b"]["cancel_state"] == CancelState.TOO_LATE


def test_status_shapes_and_casing_are_understood():
    assert status_code({"code": "KitRegistered"}) == status_code("kitregistered") == "KitRegistered"
    assert status_code({"status": {"code": "Kit Arrived At Lab"}}) == "KitArrivedAtLab"
    assert status_code({"name": "ResultsAvailable"}) == "ResultsAvailable"
    assert status_code("SomethingNew") == "SomethingNew" and status_code(None) is None
    order = parse_order({"ClientOrderId": "X", "orderItems": [
        {"ID": "i1", "Code": "GLCS", "status": "Created", "updatedAt": "2023-05-15T16:22:11.3513804Z",
         "LgcKitIdentifier": {"NumericalCode": "LGC-1234-1234-1234", "alphaCode": "QWERTY"},
         "Shipment": {"outboundTrackingNumber": "1Z9"}},
        {"code": "no id"}]}, "X")
    (item,) = order.items
    assert (item.item_id, item.code, item.status, item.barcode, item.alpha_code, item.outbound_tracking) == (
        "i1", "GLCS", "Created", "LGC-1234-1234-1234", "QWERTY", "1Z9")
    assert item.updated_at == datetime(2023, 5, 15, 16, 22, 11, 351380, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_order({"errors": []}, "X")


def test_the_sandbox_answers_in_either_status_shape(engine, settings, sandbox):
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    lgc(sandbox).lifecycle.configure(status_shape="string")
    lgc(sandbox).lifecycle.advance(coid, steps=2)
    assert track(engine, s).statuses == {"KitDispatched": 2}


def test_get_order_returns_the_order_or_none_when_letsgetchecked_does_not_know_it(engine, settings, sandbox):
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    order = get_order(s, coid)
    assert order.client_order_id == coid and {i.status for i in order.items} == {"Submitted"}
    assert {i.item_id for i in order.items} == {i["id"] for i in lgc(sandbox).orders[coid]["response"]["orderItems"]}
    assert get_order(s, "NO-SUCH-ORDER") is None


# ---- cancel --------------------------------------------------------------------------------------

def test_cancel_is_sent_marked_requested_and_confirmed_by_a_later_status(engine, settings, sandbox):
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    sb = lgc(sandbox).lifecycle
    sb.advance(coid, steps=2)  # KitDispatched: the warehouse has not seen it yet
    report = cancel(engine, s, coid, "glcs")  # the kit code, any case
    assert [o.outcome for o in report.items] == ["requested"] and report.exit_code == 0
    glcs = _by_code(engine, coid)["GLCS"]
    assert glcs["cancel_state"] == "cancel requested" and glcs["status"] == "KitDispatched"
    assert sb.item(coid, glcs["item_id"]).status == "KitDispatched"  # processed asynchronously
    assert lgc(sandbox).patch_count[coid] == 1
    assert cancel(engine, s, coid, glcs["item_id"]).items[0].outcome == "already requested"
    assert lgc(sandbox).patch_count[coid] == 1

    sb.advance(coid)  # the sandbox applies the cancel; the other item moves on
    track(engine, s)
    got = _by_code(engine, coid)
    assert (got["GLCS"]["status"], got["GLCS"]["cancel_state"]) == ("Cancelled", "cancelled")
    assert (got["FCIT"]["status"], got["FCIT"]["cancel_state"]) == ("KitRegistered", None)
    assert history(engine, glcs["item_id"])[-1]["previous_status"] == "KitDispatched"
    assert cancel(engine, s, coid, "GLCS").items[0].outcome == "already cancelled"
    assert lgc(sandbox).patch_count[coid] == 1


@pytest.mark.parametrize("status", ["Submitted", "Created", "KitDispatched", "KitRegistered"])
def test_every_status_before_the_lab_can_be_cancelled(engine, settings, sandbox, status):
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    sb = lgc(sandbox).lifecycle
    if status != "Submitted":
        sb.advance(coid, to=status)
    assert cancel(engine, s, coid).exit_code == 0
    sb.advance(coid)
    assert track(engine, s).statuses == {"Cancelled": 2}
    for item_id in items(engine):
        assert [r["status"] for r in history(engine, item_id)][-2:] == [status, "Cancelled"]
    assert open_orders(engine) == []


def test_a_cancel_is_applied_by_the_sandbox_after_a_delay(engine, settings, sandbox):
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    lgc(sandbox).lifecycle.configure(cancel_delay=0.05)
    assert cancel(engine, s, coid).exit_code == 0
    assert wait_for(lambda: track(engine, s, [coid]).statuses == {"Cancelled": 2}, timeout=30)
    assert {r["cancel_state"] for r in items(engine).values()} == {"cancelled"}


@pytest.mark.parametrize("to", ["KitArrivedAtLab", "ResultsAvailable"])
def test_cancel_is_refused_locally_once_the_kit_reached_the_lab(engine, settings, sandbox, to):
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    lgc(sandbox).lifecycle.advance(coid, to=to)  # the warehouse still thinks Submitted
    report = cancel(engine, s, coid)
    assert report.exit_code == 1 and {o.outcome for o in report.items} == {"refused"}
    assert all("KitArrivedAtLab" in o.message and to in o.message for o in report.items)
    assert lgc(sandbox).patch_count[coid] == 0  # nothing was sent
    assert {r["cancel_state"] for r in items(engine).values()} == {None}


def test_letsgetchecked_refuses_a_late_cancel_too_and_says_only_its_title(engine, settings, sandbox):
    import asyncio

    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    item = lgc(sandbox).lifecycle.orders[coid].items[0]
    lgc(sandbox).lifecycle.advance(coid, to="KitArrivedAtLab")

    async def patch():
        async with open_session(s) as session:
            api = await session.api()
            return await api.cancel_item(coid, item.id, s.lifecycle.cancel_patch)

    answer = asyncio.run(patch())
    assert (answer.accepted, answer.http_status, answer.reason) == (False, 409, "HTTP 409 Conflict")


def test_cancel_of_an_unknown_order_or_item_is_a_clear_error(engine, settings, sandbox):
    s = quick(settings)
    (coid,) = place_orders(engine, s, 1)
    with pytest.raises(UnusableInputError, match="does not know order 'NOPE'"):
        cancel(engine, s, "NOPE")
    with pytest.raises(UnusableInputError, match="has no item 'XYZ' .*GLCS"):
        cancel(engine, s, coid, "XYZ")
    assert lgc(sandbox).patch_count == {}


def test_the_sandbox_patch_endpoint_checks_the_body_and_the_item(settings, sandbox):
    base = sandbox.lgc_url
    token = httpx.post(f"{base}/oauth2/token?grant_type=client_credentials",
                       data={"grant_type": "client_credentials"},
                       auth=("sandboxaccesskey000000001", "sandboxsecretkey000000001")).json()["access_token"]
    h = {"Authorization": f"Bearer {token}"}
    assert httpx.patch(f"{base}/DEMO/api/v2/orders/NOPE/orderItem/x", headers=h,
                       json={"patchOperation": {"op": "replace", "path": "/status", "value": "Cancelled"}}
                       ).status_code == 404
    assert httpx.patch(f"{base}/DEMO/api/v2/orders/NOPE/orderItem/x", headers=h,
                       json={"op": "remove"}).status_code == 400
    assert httpx.get(f"{base}/DEMO/api/v2/orders/NOPE", headers=h).status_code == 404
    assert httpx.get(f"{base}/DEMO/api/v2/orders/NOPE").status_code == 401


# ---- the schema ----------------------------------------------------------------------------------

def test_the_lifecycle_migration_goes_down_and_up_again(engine):
    from alembic import command

    cfg = warehouse.alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0003_webhooks")
    assert "lgc_order_items" not in sa.inspect(engine).get_table_names()
    warehouse.upgrade(engine)
    names = set(sa.inspect(engine).get_table_names())
    assert {"lgc_order_items", "lgc_item_status_history", "lgc_results", "lgc_result_values"} <= names
