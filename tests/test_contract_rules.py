"""One valid and one invalid value for every rule of the LetsGetChecked PUT Order document
(and the conditional rules the issue spells out). Each case writes a one-row CSV, validates it,
and checks that the valid value passes and the invalid one is rejected on the right column with a
plain-English reason."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from etl.intake.validate import CsvValidation
from schemas.columns import REQUIRED
from tests.helpers import read_rejects, seed_row, write_csv

TOMORROW = (date.today() + timedelta(days=1)).isoformat()
PHYS_EMPTY = dict(physician_first_name="", physician_middle_name="", physician_last_name="", physician_npi="")
PCP_EMPTY = {k: "" for k in seed_row() if k.startswith("pcp_")}
INS_EMPTY = {k: "" for k in seed_row() if k.startswith("insurance_")}

# (rule, valid overrides, invalid overrides, column reported, words the reason must contain)
CASES = [
    ("clientOrderId max 100", dict(client_order_id="C" * 100), dict(client_order_id="C" * 101), "client_order_id", "101 characters; LetsGetChecked allows at most 100"),
    ("addressLine1 max 35", dict(address_line1="A" * 35), dict(address_line1="A" * 36), "address_line1", "36 characters; LetsGetChecked allows at most 35"),
    ("addressLine2 max 35", dict(address_line2="A" * 35), dict(address_line2="A" * 41), "address_line2", "41 characters"),
    ("pcp addressLine1 max 35", dict(pcp_address_line1="P" * 35), dict(pcp_address_line1="P" * 36), "pcp_address_line1", "at most 35"),
    ("pcp addressLine2 max 35", dict(pcp_address_line2="P" * 35), dict(pcp_address_line2="P" * 36), "pcp_address_line2", "at most 35"),
    ("policyNumber max 30", dict(insurance_policy_number="9" * 30), dict(insurance_policy_number="9" * 31), "insurance_policy_number", "at most 30"),
    ("PCP full name < 100", dict(pcp_first_name="F" * 49, pcp_middle_name="", pcp_last_name="L" * 49), dict(pcp_first_name="F" * 50, pcp_middle_name="", pcp_last_name="L" * 49), "pcp_first_name", "fewer than 100"),
    ("state list incl. DC", dict(state="DC"), dict(state="XX"), "state", "not a US state code"),
    ("state list incl. PR", dict(state="PR"), dict(state="ZZ"), "state", "two-letter"),
    ("pcp state list", dict(pcp_state="NY"), dict(pcp_state="New York"), "pcp_state", "not a US state code"),
    ("country US only", dict(country="US"), dict(country="CA"), "country", "allowed: US"),
    ("pcp country US only", dict(pcp_country="US"), dict(pcp_country="GB"), "pcp_country", "allowed: US"),
    ("race list", dict(race="AshkenaziOrSephardiJewish"), dict(race="African American"), "race", "did you mean 'AfricanAmerican'"),
    ("insurance hierarchy list", dict(insurance_hierarchy="Tertiary"), dict(insurance_hierarchy="Quaternary"), "insurance_hierarchy", "Unknown, Primary, Secondary, Tertiary"),
    ("gender list (case-agnostic)", dict(gender="fEmAlE"), dict(gender="F"), "gender", "not an allowed value"),
    ("ethnicity list", dict(ethnicity="NonHispanic"), dict(ethnicity="Martian"), "ethnicity", "not an allowed value"),
    ("language list (case-agnostic)", dict(participant_language="english"), dict(participant_language="Klingon"), "participant_language", "not an allowed value"),
    ("phoneCountryCode + and 1-4 digits", dict(phone_country_code="+1234"), dict(phone_country_code="+12345"), "phone_country_code", "'+' followed by 1 to 4 digits"),
    ("phoneCountryCode needs +", dict(phone_country_code="+44"), dict(phone_country_code="44"), "phone_country_code", "'+' followed by 1 to 4 digits"),
    ("phoneNumber digits", dict(phone_number="555-588-8888"), dict(phone_number="call me"), "phone_number", "4 to 15 digits"),
    ("dob YYYY-MM-DD", dict(dob="1990-01-31"), dict(dob="31/01/1990"), "dob", "YYYY-MM-DD"),
    ("dob real date", dict(dob="2000-02-29"), dict(dob="1990-02-30"), "dob", "not a real calendar date"),
    ("dob in the past", dict(dob="2001-09-09"), dict(dob=TOMORROW), "dob", "not in the past"),
    ("email format", dict(email="a.b@example.org"), dict(email="not-an-email"), "email", "not an email address"),
    ("orderItems quantity positive", dict(order_items="GLCS:3;FCIT"), dict(order_items="GLCS:0"), "order_items", "whole number of 1 or more"),
    ("orderItems quantity integer", dict(order_items="GLCS:1"), dict(order_items="GLCS:1.5"), "order_items", "whole number"),
    ("orderItems shape", dict(order_items="GLCS; FCIT:2"), dict(order_items="GLCS FCIT"), "order_items", "CODE or CODE:QUANTITY"),
    ("NPI integer", dict(physician_npi="1234567893"), dict(physician_npi="12345678ab"), "physician_npi", "not a whole number"),
    ("NPI 10 digits", dict(physician_npi="1245319599"), dict(physician_npi="123456789"), "physician_npi", "exactly 10"),
    ("NPI check digit", dict(physician_npi="1234567893"), dict(physician_npi="1000000001"), "physician_npi", "check digit"),
    ("physician block: last name", dict(PHYS_EMPTY), dict(PHYS_EMPTY, physician_first_name="Greg", physician_npi="1234567893"), "physician_last_name", "required when a physician is given"),
    ("physician block: npi", dict(PHYS_EMPTY), dict(PHYS_EMPTY, physician_first_name="Greg", physician_last_name="House"), "physician_npi", "required when a physician is given"),
    ("pcp block: id", dict(PCP_EMPTY), dict(PCP_EMPTY, pcp_first_name="A", pcp_last_name="B", pcp_address_line1="1 Main St", pcp_city="Boston", pcp_postal_code="02110"), "pcp_id", "required when a primary care provider is given"),
    ("pcp block: address", dict(PCP_EMPTY), dict(PCP_EMPTY, pcp_id="X1", pcp_first_name="A", pcp_last_name="B", pcp_city="Boston", pcp_postal_code="02110"), "pcp_address_line1", "required when a primary care provider"),
    ("insurance: policy number", dict(INS_EMPTY), dict(INS_EMPTY, insurance_group_name="G", insurance_plan_name="Plan"), "insurance_policy_number", "required when insurance is given"),
    ("insurance: plan name", dict(INS_EMPTY), dict(INS_EMPTY, insurance_policy_number="P1"), "insurance_plan_name", "required when insurance is given"),
]


def _validate(tmp_path, row):
    path = write_csv(tmp_path / "batch.csv", [row])
    validation = CsvValidation(path)
    valid = [r for chunk in validation.chunks() for r in chunk]
    rejects = read_rejects(validation.result.rejects_path) if validation.result.rejects_path else []
    return valid, rejects


@pytest.mark.parametrize("rule,good,bad,column,words", CASES, ids=[c[0] for c in CASES])
def test_rule(tmp_path, rule, good, bad, column, words):
    valid, rejects = _validate(tmp_path, seed_row(**good))
    assert rejects == [] and len(valid) == 1, f"{rule}: the valid value was rejected: {rejects}"

    valid, rejects = _validate(tmp_path, seed_row(**bad))
    assert valid == []
    assert [r["column"] for r in rejects] == [column], rejects
    (reject,) = rejects
    assert words in reject["reason"]
    assert reject["line"] == "2" and reject["client_order_id"] == seed_row(**bad)["client_order_id"]


@pytest.mark.parametrize("column", REQUIRED)
def test_required_field(tmp_path, column):
    valid, rejects = _validate(tmp_path, seed_row(**{column: "   "}))
    assert valid == []
    assert any(r["column"] == column and r["reason"] == f"{column} is required but empty" for r in rejects), rejects


def test_optional_blocks_may_be_left_out_entirely(tmp_path):
    valid, rejects = _validate(tmp_path, seed_row(**PHYS_EMPTY, **PCP_EMPTY, **INS_EMPTY, email="", state="", country=""))
    assert rejects == [] and len(valid) == 1


def test_case_agnostic_values_are_normalised(tmp_path):
    valid, _ = _validate(tmp_path, seed_row(gender="  fEMALE ", participant_language="spanish", state="ma"))
    assert (valid[0]["gender"], valid[0]["participant_language"], valid[0]["state"]) == ("Female", "SPANISH", "MA")


def test_every_problem_of_a_row_is_reported_not_just_the_first(tmp_path):
    _, rejects = _validate(tmp_path, seed_row(dob="not a date", race="Purple", address_line1="X" * 50, physician_npi="1"))
    assert {r["column"] for r in rejects} == {"dob", "race", "address_line1", "physician_npi"}
