"""The Rupa order-intent CSV contract: one row per cart a practitioner is to check out.

    row_id            required, unique in the file, <= 100 characters: the idempotency key
                      (Rupa takes none, so labsync's ledger `rupa_order_intents` keys on it)
    rupa_patient_id   a Rupa patient id (pat_…) known in the warehouse, OR
    first_name, last_name, email   (all three) to get or create the patient; birthday optional
    lab_test_ids      optional; Rupa lab test ids (labts_…) joined by `;`
    return_url        required; where Rupa sends the practitioner after checkout (http/https)
    metadata.<key>    any number of columns, kept with the row in the warehouse

Like the order batch (schemas/order_batch.py): cells arrive as trimmed strings, nothing is
coerced, each check has a name and `reason_for` turns a failure into a sentence. Whether an id
exists at Rupa is checked against the warehouse copy by etl.checkout.intents (a cross-check hook).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import urlsplit

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from schemas.columns import split_list
from schemas.contract import Contract
from schemas.order_batch import _EMAIL, _dates_ok, _dob_reason  # one date and email rule

ROW_ID = "row_id"
PATIENT_ID = "rupa_patient_id"
PATIENT_FIELDS = ("first_name", "last_name", "email")
METADATA_PREFIX = "metadata."
MAX_ROW_ID = 100

COLUMNS: tuple[str, ...] = (ROW_ID, PATIENT_ID, *PATIENT_FIELDS, "birthday", "lab_test_ids", "return_url")
REQUIRED: tuple[str, ...] = (ROW_ID, "return_url")
# The columns that hold PHI (the patient's name, email and birthday; every metadata.<key> column
# counts too: Contract.is_phi): their rejected cells stay in the reports beside the file, never in
# the warehouse, and no reason quotes them. Ids (row_id, rupa_patient_id, lab test ids) and the
# return URL are not PHI.
PHI: frozenset[str] = frozenset({*PATIENT_FIELDS, "birthday"})

_PATIENT_ID = re.compile(r"^pat_[A-Za-z0-9_-]+$")
_LAB_TEST_ID = re.compile(r"^labts_[A-Za-z0-9_-]+$")


def _url_ok(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and " " not in value


def _lab_tests_ok(value: str) -> bool:
    ids = split_list(value)
    return bool(ids) and all(_LAB_TEST_ID.match(i) for i in ids)


def _patient_requires(column: str) -> Callable[[pd.DataFrame], pd.Series]:
    def check(df: pd.DataFrame) -> pd.Series:
        return df[PATIENT_ID].notna() | df[column].notna()

    return check


class OrderIntents(pa.DataFrameModel):
    row_id: Series[str] = pa.Field(nullable=False, str_length={"max_value": MAX_ROW_ID})
    rupa_patient_id: Series[str] = pa.Field(nullable=True)
    first_name: Series[str] = pa.Field(nullable=True)
    last_name: Series[str] = pa.Field(nullable=True)
    email: Series[str] = pa.Field(nullable=True)
    birthday: Series[str] = pa.Field(nullable=True)
    lab_test_ids: Series[str] = pa.Field(nullable=True)
    return_url: Series[str] = pa.Field(nullable=False)

    class Config:
        strict = False  # metadata.<key> columns ride along
        coerce = False

    @pa.check("rupa_patient_id", name="patient_id_format")
    def _pid(cls, s: Series[str]) -> Series[bool]:
        return s.str.match(_PATIENT_ID.pattern)

    @pa.check("email", name="email_format")
    def _email(cls, s: Series[str]) -> Series[bool]:
        return s.str.match(_EMAIL.pattern)

    @pa.check("birthday", name="past_date")
    def _birthday(cls, s: Series[str]) -> Series[bool]:
        return _dates_ok(s)

    @pa.check("lab_test_ids", name="lab_test_ids_format")
    def _tests(cls, s: Series[str]) -> Series[bool]:
        return s.map(_lab_tests_ok).astype(bool)

    @pa.check("return_url", name="url")
    def _return_url(cls, s: Series[str]) -> Series[bool]:
        return s.map(_url_ok).astype(bool)

    @pa.dataframe_check(name="requires:first_name")
    def _need_first(cls, df):
        return _patient_requires("first_name")(df)

    @pa.dataframe_check(name="requires:last_name")
    def _need_last(cls, df):
        return _patient_requires("last_name")(df)

    @pa.dataframe_check(name="requires:email")
    def _need_email(cls, df):
        return _patient_requires("email")(df)


def _lab_tests_reason(column: str, value: str) -> str:
    bad = [i for i in split_list(value) if not _LAB_TEST_ID.match(i)]
    if not bad:
        return f"{column} lists no lab test; leave it empty or give ids like labts_abc111"
    return (f"{column} has {', '.join(repr(b) for b in bad[:5])}: not a Rupa lab test id "
            "(labts_…); separate several ids with ';'")


REASONS: dict[str, Callable[[str, str, str], str]] = {  # (column, value, q): see schemas.order_batch
    "not_nullable": lambda column, _v, _q: f"{column} is required but empty",
    "patient_id_format": lambda column, _v, q: f"{column}{q} is not a Rupa patient id (pat_…)",
    "email_format": lambda column, _v, q: f"{column}{q} is not an email address",
    "past_date": _dob_reason,
    "lab_test_ids_format": lambda column, value, _q: _lab_tests_reason(column, value),
    "url": lambda column, _v, q: (
        f"{column}{q} is not a web address; give a full http:// or https:// URL"),
    "str_length": lambda column, value, _q: f"{column} is {len(value)} characters; at most {MAX_ROW_ID} are allowed",
}


def reason_for(check: str, column: str, value: str | None) -> str:
    value = "" if value is None else value
    check = check.split("(", 1)[0]
    q = "" if CONTRACT.is_phi(column) else f" {value!r}"  # a PHI column's value is never quoted
    if check.startswith("requires:"):
        return (f"{column} is required when rupa_patient_id is empty (give rupa_patient_id, or "
                "first_name, last_name and email)")
    if check in REASONS:
        return REASONS[check](column, value, q)
    return f"{column}{q} breaks the rule {check}"


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    tests = frame["lab_test_ids"]
    frame["lab_test_ids"] = tests.where(tests.isna(), tests.map(lambda v: ";".join(split_list(v)) if isinstance(v, str) else v))
    return frame


CONTRACT = Contract(
    name="order-intents file", columns=COLUMNS, required=REQUIRED, schema=OrderIntents.to_schema(),
    reason_for=reason_for, id_column=ROW_ID, extra_prefix=METADATA_PREFIX,
    template="examples/intents_template.csv", row_noun="row", normalise=_normalise,
    example="examples/intents.csv", phi=PHI,
)
