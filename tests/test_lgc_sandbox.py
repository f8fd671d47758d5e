"""The LetsGetChecked sandbox, spoken to with plain httpx over loopback: token endpoint, every
status it answers, Problem Details, idempotency."""

from __future__ import annotations

import time

import httpx
import pytest

from etl.orders.payload import build_payload
from etl.sandbox.lgc import npi_is_valid, validate_order
from etl.settings import SANDBOX_LGC_ACCESS_KEY, SANDBOX_LGC_SECRET_KEY
from tests.test_lgc_support import order_row

BASIC = (SANDBOX_LGC_ACCESS_KEY, SANDBOX_LGC_SECRET_KEY)


@pytest.fixture
def lgc(sandbox):
    with httpx.Client(base_url=sandbox.lgc_url, timeout=5) as client:
        yield client


def _token(lgc) -> str:
    r = lgc.post("/oauth2/token", params={"grant_type": "client_credentials"},
                 data={"grant_type": "client_credentials"}, auth=BASIC)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["token_type"] == "Bearer" and data["expires_in"] > 0
    assert data["access_token"].count(".") == 2  # shaped like a JWT
    return data["access_token"]


def _put(lgc, coid, body, token):
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json",
               "Content-Type": "application/json"}
    return lgc.put(f"/DEMO/api/v2/orders/{coid}", json=body, headers=headers)


def test_token_endpoint_checks_grant_credentials_and_form(lgc):
    assert lgc.post("/oauth2/token", params={"grant_type": "password"}, data={}, auth=BASIC).status_code == 400
    assert lgc.post("/oauth2/token", params={"grant_type": "client_credentials"},
                    json={"grant_type": "client_credentials"}, auth=BASIC).status_code == 400
    bad = lgc.post("/oauth2/token", params={"grant_type": "client_credentials"},
                   data={"grant_type": "client_credentials"}, auth=("x" * 25, "y" * 25))
    assert bad.status_code == 401
    assert _token(lgc)


def test_accepts_then_is_idempotent_then_conflicts(lgc, sandbox):
    token = _token(lgc)
    body = build_payload(order_row(1))
    first = _put(lgc, "ORD-1", body, token)
    assert first.status_code == 202
    data = first.json()
    assert data["clientOrderId"] == "ORD-1" and data["participantId"] == "P00001"
    assert [i["code"] for i in data["orderItems"]] == ["GLCS", "FCIT"]
    assert all(i["id"] for i in data["orderItems"])
    again = _put(lgc, "ORD-1", body, token)
    assert again.status_code == 202 and again.json() == data  # the previous result
    changed = _put(lgc, "ORD-1", {**body, "programCode": "Other"}, token)
    assert changed.status_code == 409
    assert changed.headers["content-type"].startswith("application/problem+json")
    state = sandbox.sandbox.lgc
    assert state.accepted_count["ORD-1"] == 1 and state.put_count["ORD-1"] == 3


def test_bad_body_is_a_problem_details_400_naming_the_field(lgc, sandbox):
    token = _token(lgc)
    body = build_payload(order_row(1))
    body["patientInfo"]["dob"] = "1961-13-45"
    body["physicianInfo"] = {"firstName": "A", "lastName": "B", "npi": 1000000001}
    body["address"]["state"] = None
    r = _put(lgc, "ORD-2", body, token)
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["title"] and problem["status"] == 400
    assert "patientInfo.dob" in problem["detail"] and "physicianInfo.npi" in problem["detail"]
    assert problem["errors"]["address.state"] == ["must not be null"]
    assert "ORD-2" not in sandbox.sandbox.lgc.orders


@pytest.mark.parametrize(
    "case, expected",
    [("no token", 401), ("unknown token", 401), ("expired token", 401), ("unknown client", 404),
     ("text body", 415), ("accept html", 406), ("id too long", 400), ("not json", 400)],
)
def test_every_refusal(lgc, sandbox, case, expected):
    token = _token(lgc)
    body = build_payload(order_row(1))
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json",
               "Content-Type": "application/json"}
    url, content = "/DEMO/api/v2/orders/ORD-3", httpx.Request("PUT", "/", json=body).content
    if case == "no token":
        del headers["Authorization"]
    elif case == "unknown token":
        headers["Authorization"] = "Bearer abc.def.ghi"
    elif case == "expired token":
        sandbox.sandbox.lgc.expire_tokens()
    elif case == "unknown client":
        url = "/ZZZ/api/v2/orders/ORD-3"
    elif case == "text body":
        headers["Content-Type"] = "text/plain"
    elif case == "accept html":
        headers["Accept"] = "text/html"
    elif case == "id too long":
        url = "/DEMO/api/v2/orders/" + "x" * 101
    elif case == "not json":
        content = b"{not json"
    r = lgc.put(url, content=content, headers=headers)
    assert r.status_code == expected
    assert r.json()["status"] == expected
    assert sandbox.sandbox.lgc.orders == {}


def test_token_ttl_is_enforced(lgc, sandbox):
    sandbox.sandbox.lgc.token_ttl = 0.3
    token = _token(lgc)
    assert _put(lgc, "ORD-4", build_payload(order_row(4)), token).status_code == 202
    time.sleep(0.4)
    assert _put(lgc, "ORD-5", build_payload(order_row(5)), token).status_code == 401


def test_client_order_id_is_taken_from_the_encoded_path(lgc, sandbox):
    token = _token(lgc)
    r = lgc.put("/DEMO/api/v2/orders/A%2FB%20%C3%A9", json=build_payload(order_row(1)),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    assert r.status_code == 202 and r.json()["clientOrderId"] == "A/B é"
    assert "A/B é" in sandbox.sandbox.lgc.orders


def test_validation_rules_written_independently():
    assert npi_is_valid(1234567893) and not npi_is_valid(1000000001)
    assert validate_order(build_payload(order_row(1))) == {}
    bad = build_payload(order_row(1))
    bad["orderItems"] = [{"code": "GLCS", "quantity": 0}]
    bad["address"]["addressLine1"] = "x" * 36
    bad["patientInfo"]["phoneNumber"]["phoneCountryCode"] = "1"
    errors = validate_order(bad)
    assert set(errors) == {"orderItems[0].quantity", "address.addressLine1",
                           "patientInfo.phoneNumber.phoneCountryCode"}


def test_latency_is_from_arrival_to_answer_the_order_stored_at_once(lgc, sandbox):
    """A vendor whose answers take `latency`: the request is handled when it arrives (the order
    exists while the answer is still on its way) and the answer leaves when the time is up."""
    import threading

    token = _token(lgc)
    state = sandbox.sandbox.lgc
    state.faults.update(latency=0.6)
    try:
        answers = []
        put = threading.Thread(target=lambda: answers.append(_put(lgc, "SLOW-1", build_payload(order_row(2)), token)))
        started = time.monotonic()
        put.start()
        deadline = started + 5
        while "SLOW-1" not in state.orders and time.monotonic() < deadline:
            time.sleep(0.01)
        stored_after = time.monotonic() - started
        put.join(timeout=10)
        answered_after = time.monotonic() - started
    finally:
        state.faults.reset()
    assert stored_after < 0.4  # handled at once, not after the latency
    assert answers[0].status_code == 202 and answered_after >= 0.6


def test_the_standalone_sandbox_freezes_what_it_keeps_out_of_the_collector():
    import asyncio
    import gc

    from etl.sandbox.server import _FreezeEvery

    async def app(scope, receive, send):
        return None

    wrapped = _FreezeEvery(app, every=10)
    kept = [{"order": i} for i in range(100)]  # what a sandbox would keep
    before = gc.get_freeze_count()
    try:
        for _ in range(10):
            asyncio.run(wrapped({"type": "http"}, None, None))
        assert gc.get_freeze_count() >= before + len(kept)
    finally:
        gc.unfreeze()
