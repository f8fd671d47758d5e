"""The order-batch CSV contract: its columns, which are required, and the small parsers shared by
the validator and the LetsGetChecked payload mapping (so both read a cell the same way)."""

from __future__ import annotations

import re

# Every column, in template order. Each maps one-to-one onto a field of the LGC PUT body.
COLUMNS: tuple[str, ...] = (
    "client_order_id", "program_code", "participant_id", "first_name", "middle_name", "last_name",
    "email", "phone_country_code", "phone_number", "gender", "dob", "ethnicity", "race",
    "participant_language", "health_plan_name", "address_line1", "address_line2", "city", "state",
    "postal_code", "country", "order_items", "diagnosis_codes", "note",
    "physician_first_name", "physician_middle_name", "physician_last_name", "physician_npi",
    "pcp_id", "pcp_first_name", "pcp_middle_name", "pcp_last_name", "pcp_address_line1",
    "pcp_address_line2", "pcp_city", "pcp_state", "pcp_postal_code", "pcp_country", "pcp_phone",
    "pcp_phone2", "pcp_fax", "pcp_vendor_name",
    "insurance_policy_number", "insurance_plan_name", "insurance_hierarchy",
    "insurance_group_name", "insurance_group_number",
)

# Required by the LGC document: the column must exist in the file and be filled in every row.
REQUIRED: tuple[str, ...] = (
    "client_order_id", "program_code", "participant_id", "first_name", "last_name",
    "phone_country_code", "phone_number", "gender", "dob", "ethnicity", "race",
    "address_line1", "city", "postal_code", "order_items",
)

# The columns that hold PHI: the patient's HIPAA identifiers (names, email, phone, date of birth,
# address below the state, participant and insurance numbers) and health or free text (diagnosis
# codes, the note; every custom.<key> column counts too: schemas.contract.Contract.is_phi). The one
# declaration: a rejected cell of these columns is never stored in the warehouse (its value stays
# in the rejects report and the fix file beside the batch) and no reason quotes it (reasons name the
# column and the rule). Ids (client_order_id, rupa_patient_id), vocabulary columns (gender, state,
# ...), kit codes and the provider's own details are not PHI here: their rejected values are shown.
PHI: frozenset[str] = frozenset({
    "participant_id", "first_name", "middle_name", "last_name", "email", "phone_number", "dob",
    "address_line1", "address_line2", "city", "postal_code", "diagnosis_codes", "note",
    "insurance_policy_number", "insurance_group_number",
})

# Columns that may be filled from the warehouse's Rupa copy when `rupa_patient_id` is given.
RUPA_FILLABLE: tuple[str, ...] = ("first_name", "last_name", "email", "dob")
RUPA_PATIENT_ID = "rupa_patient_id"

CUSTOM_PREFIX = "custom."
LIST_SEPARATOR = ";"

_ORDER_ITEM = re.compile(r"^(?P<code>[^:;\s]+)\s*(?::(?P<qty>.*))?$")

# ---- ids that travel in a URL path ------------------------------------------------------------
# clientOrderId (and clientId, and Rupa ids) become one segment of a URL path. Only the URL's
# unreserved characters travel through every client, proxy and server exactly as written: no
# percent-encoding for any hop to decode twice or not at all. Dots get two more rules, because
# `.` and `..` are removed by URL normalisation (httpx does it before sending) and servers trim
# trailing dots or block segments that start with one.
PATH_ID_CHARACTERS = "letters, digits and - _ . ~ (no dot at the start or end, no two dots in a row)"
PATH_ID_PATTERN = r"[A-Za-z0-9_~-](?:[A-Za-z0-9._~-]*[A-Za-z0-9_~-])?"
_PATH_ID = re.compile(PATH_ID_PATTERN)
_PATH_ID_CHAR = re.compile(r"[A-Za-z0-9._~-]")


def _describe_char(ch: str) -> str:
    if ch == " ":
        return "a space"
    if ch.isprintable() and ord(ch) < 0x80:
        return repr(ch)
    if ch.isprintable():
        return f"{ch!r} (U+{ord(ch):04X}, not a plain ASCII character)"
    return f"an invisible or control character (U+{ord(ch):04X})"


def path_id_problem(value: str) -> str | None:
    """Why `value` cannot travel as one URL path segment exactly as written, or None if it can.
    The phrase completes a sentence such as "client_order_id contains '/'"."""
    if not value:
        return "is empty"
    if _PATH_ID.fullmatch(value) and ".." not in value:
        return None
    bad = next((ch for ch in value if not _PATH_ID_CHAR.fullmatch(ch)), None)
    if bad is not None:
        return f"contains {_describe_char(bad)}"
    if ".." in value:
        return "has two dots in a row"
    return "starts or ends with a dot"


def is_custom(column: str) -> bool:
    return column.startswith(CUSTOM_PREFIX) and len(column) > len(CUSTOM_PREFIX)


def is_phi(column: str) -> bool:
    """Whether a column of an order batch holds PHI (PHI, and every custom.<key> column)."""
    return column in PHI or is_custom(column)


def split_list(cell: str | None) -> list[str]:
    """`D01; D02` -> ["D01", "D02"]; empty parts are dropped."""
    if not cell:
        return []
    return [part.strip() for part in cell.split(LIST_SEPARATOR) if part.strip()]


class OrderItemError(ValueError):
    """An `order_items` entry that cannot be read; the message is a plain-English reason."""


def parse_order_items(cell: str | None) -> list[tuple[str, int]]:
    """`GLCS;FCIT:2` -> [("GLCS", 1), ("FCIT", 2)]. Quantity defaults to 1 and must be a
    positive whole number. Raises OrderItemError with a reason a program manager can act on."""
    items = split_list(cell)
    if not items:
        raise OrderItemError("order_items is empty; give at least one test kit code, e.g. GLCS or GLCS:2")
    out: list[tuple[str, int]] = []
    for item in items:
        m = _ORDER_ITEM.match(item)
        if not m:
            raise OrderItemError(f"order item {item!r} is not CODE or CODE:QUANTITY")
        qty_raw = m.group("qty")
        if qty_raw is None:
            qty = 1
        else:
            qty_raw = qty_raw.strip()
            if not qty_raw.isdigit() or int(qty_raw) < 1:
                raise OrderItemError(
                    f"order item {item!r} has quantity {qty_raw!r}; the quantity must be a whole number of 1 or more"
                )
            qty = int(qty_raw)
        out.append((m.group("code"), qty))
    return out
