"""The Rupa client on its own: JSON:API errors, paging by links.next, create_patient's
de-duplication, order intents, and the refusals that protect the token."""

from __future__ import annotations

import httpx
import pytest
import respx

from etl.errors import ApiError, AuthError, ConfigError
from etl.rupa.auth import StaticToken, parse_authorization_response
from etl.rupa.client import RupaApiError, RupaClient, open_client
from etl.settings import RupaSettings, Settings
from tests.conftest import FAST_RETRY


@pytest.fixture
def rupa(sandbox):
    return sandbox.sandbox.rupa


@pytest.fixture
def client(sandbox, rupa, tmp_path):
    settings = Settings(warehouse_url=f"sqlite:///{tmp_path / 'w.db'}", retry=FAST_RETRY,
                        rupa=RupaSettings(base_url=sandbox.rupa_url, page_size=8,
                                          api_token=rupa.mint_access_token()))
    with open_client(settings) as c:
        yield c


def test_pages_follow_links_next_and_stay_stable_while_rows_are_deleted(client, rupa):
    pages = client.pages("/patients")
    first = next(pages)
    assert len(first.data) == 8 and first.total == 50 and first.next_url
    rupa.delete_patient(first.data[0]["id"])  # already read: must not shift later pages
    rest = [r["id"] for p in pages for r in p.data]
    assert len(rest) == 42 and len(set(rest) | {r["id"] for r in first.data}) == 50
    assert [r["id"] for r in client.list_lab_tests()][:2] == ["labts_0000000", "labts_0000001"]


def test_json_api_errors_become_clear_exceptions_without_submitted_values(client):
    with pytest.raises(RupaApiError) as info:
        client.create_patient("Katherine", "Johnson", "")
    err = info.value
    assert err.status == 422 and err.codes == ["missing_attribute"]
    assert "HTTP 422" in str(err) and "/data/attributes/email" in str(err)
    assert "Katherine" not in str(err) and "Johnson" not in str(err)

    with pytest.raises(RupaApiError) as info:
        client.get_patient("pat_nope")
    assert info.value.status == 404 and "not_found" in str(info.value)


def test_create_patient_returns_the_existing_patient_for_the_same_name_and_email(client, rupa):
    made = client.create_patient("Katherine", "Johnson", "kj@example.test", birthday="1918-08-26")
    again = client.create_patient("Katherine", "Johnson", "KJ@example.test")
    other = client.create_patient("Katherine", "Johnson", "katherine@example.test")
    assert again["id"] == made["id"] and other["id"] != made["id"]
    assert made["attributes"]["birthday"] == "1918-08-26"

    seeded = rupa.patient("pat_0000007")["attributes"]
    same = client.create_patient(seeded["first_name"], seeded["last_name"], seeded["email"])
    assert same["id"] == "pat_0000007"
    assert rupa.stats["patient_deduplicated"] == 2


def test_create_order_intent_returns_a_checkout_url(client):
    patient = client.create_patient("Mary", "Jackson", "mj@example.test")
    intent = client.create_order_intent(patient["id"], return_url="https://app.example/done",
                                        lab_test_ids=["labts_0000001", "labts_0000002"])
    assert intent.id and intent.checkout_url.endswith(f"/checkout/{intent.id}")
    assert httpx.get(intent.checkout_url).status_code == 200
    rel = intent.resource["relationships"]
    assert rel["patient"]["data"]["id"] == patient["id"] and len(rel["lab_tests"]["data"]) == 2

    with pytest.raises(RupaApiError, match="lab_tests"):
        client.create_order_intent(patient["id"], return_url="https://x", lab_test_ids=["labts_missing"])


def test_writes_survive_throttling_and_a_dropped_connection(client, rupa):
    rupa.faults.update(script=[429, "drop", 503], retry_after=0.01)
    made = client.create_patient("Dorothy", "Vaughan", "dv@example.test")
    assert client.create_patient("Dorothy", "Vaughan", "dv@example.test")["id"] == made["id"]
    assert rupa.faults.injected == {"errors": 1, "throttled": 1, "dropped": 1}


def test_an_api_token_refused_is_an_auth_error(sandbox):
    settings = Settings(retry=FAST_RETRY, rupa=RupaSettings(base_url=sandbox.rupa_url, api_token="bogus"))
    with open_client(settings) as c, pytest.raises(AuthError, match="RUPA_API_TOKEN") as info:
        list(c.list_patients())
    assert info.value.exit_code == 2 and "bogus" not in str(info.value)


def test_oauth_mode_needs_a_warehouse(sandbox):
    with pytest.raises(ConfigError, match="LABSYNC_WAREHOUSE_URL"):
        open_client(Settings(rupa=RupaSettings(base_url=sandbox.rupa_url)), None)


def _respx_client(base: str = "https://rupa.test") -> RupaClient:
    settings = RupaSettings(base_url=base, api_token="t", page_size=2)
    return RupaClient(settings, FAST_RETRY, StaticToken("t"), httpx.Client())


@respx.mock
def test_relative_and_link_object_next_links_are_followed_but_other_hosts_refused():
    respx.get("https://rupa.test/patients", params={"page[size]": "2"}).respond(
        json={"data": [{"type": "patient", "id": "a"}], "links": {"next": "/patients?cursor=2"}})
    respx.get("https://rupa.test/patients", params={"cursor": "2"}).respond(
        json={"data": [{"type": "patient", "id": "b"}], "links": {"next": {"href": "https://rupa.test/patients?cursor=3"}}})
    respx.get("https://rupa.test/patients", params={"cursor": "3"}).respond(
        json={"data": [{"type": "patient", "id": "c"}], "links": {"next": "https://evil.test/patients?cursor=4"}})
    with _respx_client() as c:
        got = []
        with pytest.raises(RupaApiError, match="another host"):
            for r in c.list_patients():
                got.append(r["id"])
    assert got == ["a", "b"]  # the page that carried the foreign link is not trusted either
    assert c.http.is_closed


@respx.mock
def test_a_5xx_storm_beyond_the_retry_budget_is_an_api_error():
    route = respx.get("https://rupa.test/lab_tests").respond(502, text="<html>bad gateway</html>")
    with _respx_client() as c, pytest.raises(ApiError, match="HTTP 502 after retries"):
        list(c.list_lab_tests())
    assert route.call_count == FAST_RETRY.max_attempts


def test_parse_authorization_response_accepts_a_code_or_the_redirected_url():
    assert parse_authorization_response("abc123") == "abc123"
    assert parse_authorization_response("http://127.0.0.1:8765/oauth/callback?code=xyz&state=s1", "s1") == "xyz"
    with pytest.raises(AuthError, match="state"):
        parse_authorization_response("http://h/cb?code=xyz&state=other", "s1")
    with pytest.raises(AuthError, match="access_denied"):
        parse_authorization_response("http://h/cb?error=access_denied")


def test_the_sandbox_pages_are_the_documents_it_always_wrote_and_show_edits_at_once(sandbox, rupa):
    """The sandbox keeps each generated record's JSON text: a page must still be exactly the
    document it used to write, and an edit or deletion must show on the next listing."""
    import json

    auth = {"Authorization": f"Bearer {rupa.mint_access_token()}"}

    def listing() -> httpx.Response:
        return httpx.get(f"{sandbox.rupa_url}/patients", params={"page[size]": "3"}, headers=auth)

    first = listing()
    links = first.json()["links"]
    assert first.content == json.dumps(
        {"data": [rupa.patients.resource(p) for p in range(3)], "links": links, "meta": {"total": 50}},
        separators=(",", ":")).encode()
    rupa.update_patient(rupa.patients.id_of(1), last_name="Renamed")
    rupa.delete_patient(rupa.patients.id_of(0))
    again = listing().json()
    assert [r["id"] for r in again["data"]] == [rupa.patients.id_of(p) for p in (1, 2, 3)]
    assert again["data"][0]["attributes"]["last_name"] == "Renamed"
    assert again["data"][1] == rupa.patients.resource(2) and again["meta"]["total"] == 49
