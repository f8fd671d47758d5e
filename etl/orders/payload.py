"""The ONE mapping from a validated CSV row to the body of `PUT {clientId}/api/v2/orders/{id}`.

The body is shaped exactly like the sample request of the LetsGetChecked PUT Order document.
Optional values and optional blocks are *omitted* when empty, never sent as `null`: the API
treats a present-but-null field differently from an absent one, and an empty `physicianInfo`
would be a validation error there.

`payload_sha256` is what the ledger stores: a canonical JSON hash, so the same row always hashes
the same and a changed row (a different order for an already accepted clientOrderId) is noticed
without sending it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from etl.errors import PayloadError
from schemas.columns import CUSTOM_PREFIX, is_custom, parse_order_items, split_list


def _value(row: Mapping[str, Any], column: str) -> str | None:
    value = row.get(column)
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def _compact(pairs: Mapping[str, Any]) -> dict:
    """Drop None values and empty blocks; keep the key order (the document's order)."""
    return {k: v for k, v in pairs.items() if v is not None and v != {} and v != []}


def _address(row: Mapping[str, Any], prefix: str = "") -> dict:
    return _compact(
        {
            "addressLine1": _value(row, f"{prefix}address_line1"),
            "addressLine2": _value(row, f"{prefix}address_line2"),
            "city": _value(row, f"{prefix}city"),
            "countryIsoAlpha2": _value(row, f"{prefix}country"),
            "postalCode": _value(row, f"{prefix}postal_code"),
            "state": _value(row, f"{prefix}state"),
        }
    )


def _npi(row: Mapping[str, Any]) -> int | None:
    raw = _value(row, "physician_npi")
    if raw is None:
        return None
    if not raw.isdigit():
        raise PayloadError("physician_npi is not a digit string")
    return int(raw)


def client_order_id(row: Mapping[str, Any]) -> str:
    coid = _value(row, "client_order_id")
    if coid is None:
        raise PayloadError("client_order_id is empty")
    return coid


def build_payload(row: Mapping[str, Any]) -> dict:
    """Validated row dict (see etl.intake.validate) -> PUT body (a JSON-ready dict)."""
    try:
        items = parse_order_items(_value(row, "order_items"))
    except ValueError as exc:  # OrderItemError: its message names codes, never PHI
        raise PayloadError(str(exc)) from None

    patient = _compact(
        {
            "participantId": _value(row, "participant_id"),
            "firstName": _value(row, "first_name"),
            "middleName": _value(row, "middle_name"),
            "lastName": _value(row, "last_name"),
            "email": _value(row, "email"),
            "phoneNumber": _compact(
                {
                    "phoneCountryCode": _value(row, "phone_country_code"),
                    "phoneNumber": _value(row, "phone_number"),
                }
            ),
            "gender": _value(row, "gender"),
            "dob": _value(row, "dob"),
            "ethnicity": _value(row, "ethnicity"),
            "race": _value(row, "race"),
            "participantLanguage": _value(row, "participant_language"),
            "healthPlanName": _value(row, "health_plan_name"),
        }
    )
    physician = _compact(
        {
            "firstName": _value(row, "physician_first_name"),
            "middleName": _value(row, "physician_middle_name"),
            "lastName": _value(row, "physician_last_name"),
            "npi": _npi(row),
        }
    )
    pcp = _compact(
        {
            "id": _value(row, "pcp_id"),
            "firstName": _value(row, "pcp_first_name"),
            "middleName": _value(row, "pcp_middle_name"),
            "lastName": _value(row, "pcp_last_name"),
            "address": _address(row, "pcp_"),
            "phone": _value(row, "pcp_phone"),
            "phone2": _value(row, "pcp_phone2"),
            "fax": _value(row, "pcp_fax"),
            "vendorName": _value(row, "pcp_vendor_name"),
        }
    )
    plan = _compact(
        {
            "policyNumber": _value(row, "insurance_policy_number"),
            "planName": _value(row, "insurance_plan_name"),
            "hierarchy": _value(row, "insurance_hierarchy"),
            "groupName": _value(row, "insurance_group_name"),
            "groupNumber": _value(row, "insurance_group_number"),
        }
    )
    custom = [
        {"key": column[len(CUSTOM_PREFIX):], "value": value}
        for column in row
        if isinstance(column, str) and is_custom(column)
        and (value := _value(row, column)) is not None
    ]
    return _compact(
        {
            "address": _address(row),
            "patientInfo": patient,
            "programCode": _value(row, "program_code"),
            "orderItems": [{"code": code, "quantity": qty} for code, qty in items],
            "physicianInfo": physician,
            "primaryCareProvider": pcp,
            "insurance": {"insurancePlan": plan} if plan else None,
            "note": _value(row, "note"),
            "diagnosisCodes": split_list(_value(row, "diagnosis_codes")),
            "customData": custom,
        }
    )


def canonical_json(body: Mapping[str, Any]) -> bytes:
    """The bytes that are hashed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def payload_sha256(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(body)).hexdigest()
