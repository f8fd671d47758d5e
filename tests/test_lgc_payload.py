"""The one mapping row -> PUT body: the seed document's sample request, fed as CSV through the
real validator, comes out as the sample JSON; empty optional blocks are omitted, never null."""

from __future__ import annotations

import json

from etl.claims import now
from etl.intake.validate import CsvValidation
from etl.orders.outbox import body_bytes, staged
from etl.orders.payload import build_payload, payload_sha256
from etl.vault import Vault
from tests.conftest import TEST_FERNET_KEY
from tests.test_lgc_support import order_row, write_csv

# The sample request of the PUT Order document (../shared/seeds/004_…), verbatim except the
# NPI: the document's 1000000001 fails the NPI check digit; 1234567893 is a valid one.
SAMPLE = json.loads("""
{
"address":{"addressLine1":"Line1","addressLine2":"Line2","city":"Boston","countryIsoAlpha2":"US",
 "postalCode":"55555","state":"MA"},
"patientInfo": {"participantId":"11111","firstName":"fName","middleName":"mName","lastName":"lName",
 "email":"test@email.com","phoneNumber":{"phoneCountryCode":"+1","phoneNumber":"555588888"},
 "gender": "Male","dob": "1901-12-06","ethnicity": "Hispanic","race": "AfricanAmerican",
 "participantLanguage": "SPANISH","healthPlanName": "PayerPlanName"},
"programCode": "Health4All",
"orderItems": [{"code":"GLCS","quantity":1},{"code":"FCIT","quantity":1}],
"physicianInfo":{"firstName":"PhysicianFirstName","middleName":"MiddleName",
 "lastName":"PhysicianLastName","npi":1234567893},
"primaryCareProvider":{"id":"PCP1234567","firstName":"test","middleName":"middle","lastName":"last",
 "address":{"addressLine1":"330 W 38th Street","addressLine2":"405","city":"New York",
  "countryIsoAlpha2":"US","postalCode":"10018"},
 "phone":"965878945","phone2":"123456789","fax":"8181818181","vendorName":"vendorName"},
"insurance": {"insurancePlan": {"policyNumber":"12345","planName":"InsurancePlanName",
 "hierarchy":"Primary","groupName":"InsuranceGroupName","groupNumber": "GH123"}},
"note":"Order Note",
"diagnosisCodes":["D01","D02"],
"customData":[{"key":"SubscriberID","value":"12345678"},{"key":"key2","value":"value2"},
 {"key":"key3","value":"value3"}]
}
""")

# The same order written as a program manager would, in the CSV template's columns.
SAMPLE_CSV = {
    "client_order_id": "1234567", "program_code": "Health4All", "participant_id": "11111",
    "first_name": "fName", "middle_name": "mName", "last_name": "lName",
    "email": "test@email.com", "phone_country_code": "+1", "phone_number": "555588888",
    "gender": "male", "dob": "1901-12-06", "ethnicity": "Hispanic", "race": "AfricanAmerican",
    "participant_language": "spanish", "health_plan_name": "PayerPlanName",
    "address_line1": "Line1", "address_line2": "Line2", "city": "Boston", "state": "MA",
    "postal_code": "55555", "country": "US", "order_items": "GLCS;FCIT:1",
    "diagnosis_codes": "D01; D02", "note": "Order Note",
    "physician_first_name": "PhysicianFirstName", "physician_middle_name": "MiddleName",
    "physician_last_name": "PhysicianLastName", "physician_npi": "1234567893",
    "pcp_id": "PCP1234567", "pcp_first_name": "test", "pcp_middle_name": "middle",
    "pcp_last_name": "last", "pcp_address_line1": "330 W 38th Street", "pcp_address_line2": "405",
    "pcp_city": "New York", "pcp_state": "", "pcp_postal_code": "10018", "pcp_country": "US",
    "pcp_phone": "965878945", "pcp_phone2": "123456789", "pcp_fax": "8181818181",
    "pcp_vendor_name": "vendorName", "insurance_policy_number": "12345",
    "insurance_plan_name": "InsurancePlanName", "insurance_hierarchy": "Primary",
    "insurance_group_name": "InsuranceGroupName", "insurance_group_number": "GH123",
    "custom.SubscriberID": "12345678", "custom.key2": "value2", "custom.key3": "value3",
}


def _nulls(value) -> list:
    if value is None:
        return [None]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _nulls(v)]
    if isinstance(value, list):
        return [n for v in value for n in _nulls(v)]
    return []


def test_the_documents_sample_fed_as_csv_gives_the_sample_body(tmp_path):
    path = write_csv(tmp_path / "sample.csv", [SAMPLE_CSV])
    validation = CsvValidation(path)
    rows = [r for chunk in validation.chunks() for r in chunk]
    assert validation.result.rejected_rows == 0, "the sample must pass the CSV contract"
    assert len(rows) == 1
    body = build_payload(rows[0])
    assert body == SAMPLE
    # the bytes on the wire are that body, in the document's key order, with an integer NPI
    sent = json.loads(body_bytes(body))
    assert sent == SAMPLE
    assert list(sent) == list(SAMPLE)
    assert isinstance(sent["physicianInfo"]["npi"], int)


def test_optional_blocks_are_omitted_never_null():
    body = build_payload(order_row(1))
    assert _nulls(body) == []
    for absent in ("physicianInfo", "primaryCareProvider", "insurance", "note",
                   "diagnosisCodes", "customData"):
        assert absent not in body
    assert "middleName" not in body["patientInfo"]
    assert "addressLine2" not in body["address"]
    assert body["orderItems"] == [{"code": "GLCS", "quantity": 1}, {"code": "FCIT", "quantity": 2}]


def test_partial_blocks_and_custom_pairs_keep_only_filled_values():
    row = order_row(1, insurance_policy_number="P1", insurance_plan_name="Plan",
                    pcp_id="X1", pcp_first_name="P", pcp_last_name="C", pcp_address_line1="1 A St",
                    pcp_city="Town", pcp_postal_code="10001")
    row["custom.kept"] = "v"
    row["custom.dropped"] = None
    body = build_payload(row)
    assert body["insurance"] == {"insurancePlan": {"policyNumber": "P1", "planName": "Plan"}}
    assert body["primaryCareProvider"] == {
        "id": "X1", "firstName": "P", "lastName": "C",
        "address": {"addressLine1": "1 A St", "city": "Town", "postalCode": "10001"},
    }
    assert body["customData"] == [{"key": "kept", "value": "v"}]


VAULT = Vault([TEST_FERNET_KEY.encode()], "tests")


def test_payload_hash_is_stable_and_changes_with_the_order():
    at = now()
    a = staged(order_row(1), 1, at, VAULT)
    b = staged(dict(reversed(list(order_row(1).items()))), 1, at, VAULT)
    c = staged(order_row(1, order_items="GLCS"), 1, at, VAULT)
    body = build_payload(order_row(1))
    assert a["body_sha256"] == b["body_sha256"] == payload_sha256(body)
    assert a["body_sha256"] != c["body_sha256"]
    # the outbox keeps the exact bytes sent, sealed: no patient data in the column's text
    assert a["body"].startswith("fernet:") and "Ada" not in a["body"]
    assert VAULT.open(a["body"]).encode() == body_bytes(body)


def test_a_row_that_cannot_be_mapped_is_staged_as_a_local_rejection():
    item = staged(order_row(1, order_items="GLCS:zero"), 1, now(), VAULT)
    assert item["body"] is None and item["outcome"] == "rejected" and "quantity" in item["last_error"]


def test_the_example_batch_starts_with_the_documents_sample_order():
    """README and `make demo` say examples/orders.csv row one is the seed's sample request."""
    from tests.helpers import EXAMPLES

    first = next(CsvValidation(EXAMPLES / "orders.csv").chunks())[0]
    assert first["line"] == 2
    assert build_payload(first) == SAMPLE
