"""The pandera model of an order batch: every rule the LetsGetChecked PUT Order document states.

Cells arrive as trimmed strings (empty -> missing): nothing is coerced, so a bad date or a bad
number never hides another problem in the same column. Each check has a `name`; `REASONS` turns
(check name, column, value) into the plain-English sentence a program manager reads in the
reject report. Rules that involve several columns (a physician block must be complete, …) are
dataframe checks named `requires:<column>` or `pcp_full_name`, reported against that column.
"""

from __future__ import annotations

import difflib
import re
import weakref
from collections.abc import Callable
from datetime import date

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from schemas import vocab
from schemas.columns import OrderItemError, parse_order_items

MAX_CLIENT_ORDER_ID = 100
MAX_ADDRESS_LINE = 35
MAX_POLICY_NUMBER = 30
MAX_PCP_FULL_NAME = 99  # "less than 100 characters"

_PHONE_CC = re.compile(r"^\+\d{1,4}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_PHONE = re.compile(r"^[0-9]{4,15}$")

# The multi-column rules: when any column of a block is filled, these must be too.
PHYSICIAN_BLOCK = ("physician_first_name", "physician_middle_name", "physician_last_name", "physician_npi")
PHYSICIAN_REQUIRED = ("physician_first_name", "physician_last_name", "physician_npi")
PCP_BLOCK = (
    "pcp_id", "pcp_first_name", "pcp_middle_name", "pcp_last_name", "pcp_address_line1",
    "pcp_address_line2", "pcp_city", "pcp_state", "pcp_postal_code", "pcp_country", "pcp_phone",
    "pcp_phone2", "pcp_fax", "pcp_vendor_name",
)
PCP_REQUIRED = ("pcp_id", "pcp_first_name", "pcp_last_name", "pcp_address_line1", "pcp_city", "pcp_postal_code")
INSURANCE_BLOCK = (
    "insurance_policy_number", "insurance_plan_name", "insurance_hierarchy",
    "insurance_group_name", "insurance_group_number",
)
INSURANCE_REQUIRED = ("insurance_policy_number", "insurance_plan_name")
BLOCKS = {
    "physician": (PHYSICIAN_BLOCK, PHYSICIAN_REQUIRED, "a physician"),
    "pcp": (PCP_BLOCK, PCP_REQUIRED, "a primary care provider"),
    "insurance": (INSURANCE_BLOCK, INSURANCE_REQUIRED, "insurance"),
}


def npi_is_valid(npi: str) -> bool:
    """10 digits whose last is the Luhn check digit over the NPI prefixed with 80840 (CMS rule)."""
    if len(npi) != 10 or not npi.isdigit():
        return False
    total = 24  # the constant contribution of the "80840" prefix
    for i, ch in enumerate(reversed(npi[:9])):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return (10 - total % 10) % 10 == int(npi[9])


def _dates_ok(s: pd.Series) -> pd.Series:
    shaped = s.str.match(_DATE.pattern)
    parsed = pd.to_datetime(s.where(shaped), format="%Y-%m-%d", errors="coerce")
    return parsed.notna() & (parsed < pd.Timestamp(date.today()))


def _memo_map(s: pd.Series, fn: Callable[[str], bool]) -> pd.Series:
    """Element-wise check run once per distinct value (kit codes and NPIs repeat a lot). The
    values are numbered by pd.factorize (Arrow's dictionary encoding: no Python per row);
    pandera has already dropped missing cells (a missing cell here would count as passing)."""
    codes, uniques = pd.factorize(s)
    verdict = np.fromiter((fn(v) for v in uniques), dtype=bool, count=len(uniques))
    return pd.Series(np.where(codes >= 0, verdict[codes], True), index=s.index)


def _order_items_ok(value: str) -> bool:
    try:
        parse_order_items(value)
    except OrderItemError:
        return False
    return True


_filled_cache: tuple[weakref.ref, dict[str, np.ndarray]] | None = None  # the last frame checked


def _block_filled(df: pd.DataFrame, block: str) -> np.ndarray:
    """Rows where any column of the block is filled; computed once per frame and block (each
    block has several `requires:` checks), column by column rather than by copying df[members]."""
    global _filled_cache
    entry = _filled_cache
    if entry is None or entry[0]() is not df:
        entry = _filled_cache = (weakref.ref(df), {})
    per_block = entry[1]
    if block not in per_block:
        per_block[block] = np.logical_or.reduce([df[m].notna().to_numpy() for m in BLOCKS[block][0]])
    return per_block[block]


def _block_requires(block: str, column: str) -> Callable[[pd.DataFrame], pd.Series]:
    def check(df: pd.DataFrame) -> pd.Series:
        return pd.Series(~(_block_filled(df, block) & df[column].isna().to_numpy()), index=df.index)

    check.__name__ = f"requires_{column}"
    return check


def _text(nullable: bool = True, **kw) -> pa.Field:
    return pa.Field(nullable=nullable, **kw)


class OrderBatch(pa.DataFrameModel):
    """One row per order. Column names are the CSV header; see schemas/columns.py."""

    client_order_id: Series[str] = _text(False, str_length={"max_value": MAX_CLIENT_ORDER_ID})
    program_code: Series[str] = _text(False)
    participant_id: Series[str] = _text(False)
    first_name: Series[str] = _text(False)
    middle_name: Series[str] = _text()
    last_name: Series[str] = _text(False)
    email: Series[str] = _text()
    phone_country_code: Series[str] = _text(False)
    phone_number: Series[str] = _text(False)
    gender: Series[str] = _text(False, isin=list(vocab.GENDERS))
    dob: Series[str] = _text(False)
    ethnicity: Series[str] = _text(False, isin=list(vocab.ETHNICITIES))
    race: Series[str] = _text(False, isin=list(vocab.RACES))
    participant_language: Series[str] = _text(isin=list(vocab.LANGUAGES))
    health_plan_name: Series[str] = _text()
    address_line1: Series[str] = _text(False, str_length={"max_value": MAX_ADDRESS_LINE})
    address_line2: Series[str] = _text(str_length={"max_value": MAX_ADDRESS_LINE})
    city: Series[str] = _text(False)
    state: Series[str] = _text(isin=vocab.STATES)
    postal_code: Series[str] = _text(False)
    country: Series[str] = _text(isin=list(vocab.COUNTRIES))
    order_items: Series[str] = _text(False)
    diagnosis_codes: Series[str] = _text()
    note: Series[str] = _text()
    physician_first_name: Series[str] = _text()
    physician_middle_name: Series[str] = _text()
    physician_last_name: Series[str] = _text()
    physician_npi: Series[str] = _text()
    pcp_id: Series[str] = _text()
    pcp_first_name: Series[str] = _text()
    pcp_middle_name: Series[str] = _text()
    pcp_last_name: Series[str] = _text()
    pcp_address_line1: Series[str] = _text(str_length={"max_value": MAX_ADDRESS_LINE})
    pcp_address_line2: Series[str] = _text(str_length={"max_value": MAX_ADDRESS_LINE})
    pcp_city: Series[str] = _text()
    pcp_state: Series[str] = _text(isin=vocab.STATES)
    pcp_postal_code: Series[str] = _text()
    pcp_country: Series[str] = _text(isin=list(vocab.COUNTRIES))
    pcp_phone: Series[str] = _text()
    pcp_phone2: Series[str] = _text()
    pcp_fax: Series[str] = _text()
    pcp_vendor_name: Series[str] = _text()
    insurance_policy_number: Series[str] = _text(str_length={"max_value": MAX_POLICY_NUMBER})
    insurance_plan_name: Series[str] = _text()
    insurance_hierarchy: Series[str] = _text(isin=list(vocab.INSURANCE_HIERARCHIES))
    insurance_group_name: Series[str] = _text()
    insurance_group_number: Series[str] = _text()

    class Config:
        strict = False  # custom.<key> and rupa_patient_id columns ride along
        coerce = False  # never coerce: a failed coercion would hide the column's other checks

    @pa.check("phone_country_code", name="phone_country_code_format")
    def _phone_cc(cls, s: Series[str]) -> Series[bool]:
        return s.str.match(_PHONE_CC.pattern)

    @pa.check("phone_number", name="phone_number_format")
    def _phone(cls, s: Series[str]) -> Series[bool]:
        return s.str.match(_PHONE.pattern)

    @pa.check("email", name="email_format")
    def _email(cls, s: Series[str]) -> Series[bool]:
        return s.str.match(_EMAIL.pattern)

    @pa.check("dob", name="past_date")
    def _dob(cls, s: Series[str]) -> Series[bool]:
        return _dates_ok(s)

    @pa.check("order_items", name="order_items_format")
    def _items(cls, s: Series[str]) -> Series[bool]:
        return _memo_map(s, _order_items_ok)

    @pa.check("physician_npi", name="npi")
    def _npi(cls, s: Series[str]) -> Series[bool]:
        return _memo_map(s, npi_is_valid)

    @pa.dataframe_check(name="pcp_full_name")
    def _pcp_full_name(cls, df: pd.DataFrame) -> Series[bool]:
        return _pcp_full_name_length(df) <= MAX_PCP_FULL_NAME

    # The conditional blocks: one named check per column that becomes required.
    @pa.dataframe_check(name="requires:physician_first_name")
    def _req_phys_first(cls, df):
        return _block_requires("physician", "physician_first_name")(df)

    @pa.dataframe_check(name="requires:physician_last_name")
    def _req_phys_last(cls, df):
        return _block_requires("physician", "physician_last_name")(df)

    @pa.dataframe_check(name="requires:physician_npi")
    def _req_phys_npi(cls, df):
        return _block_requires("physician", "physician_npi")(df)

    @pa.dataframe_check(name="requires:pcp_id")
    def _req_pcp_id(cls, df):
        return _block_requires("pcp", "pcp_id")(df)

    @pa.dataframe_check(name="requires:pcp_first_name")
    def _req_pcp_first(cls, df):
        return _block_requires("pcp", "pcp_first_name")(df)

    @pa.dataframe_check(name="requires:pcp_last_name")
    def _req_pcp_last(cls, df):
        return _block_requires("pcp", "pcp_last_name")(df)

    @pa.dataframe_check(name="requires:pcp_address_line1")
    def _req_pcp_addr(cls, df):
        return _block_requires("pcp", "pcp_address_line1")(df)

    @pa.dataframe_check(name="requires:pcp_city")
    def _req_pcp_city(cls, df):
        return _block_requires("pcp", "pcp_city")(df)

    @pa.dataframe_check(name="requires:pcp_postal_code")
    def _req_pcp_postal(cls, df):
        return _block_requires("pcp", "pcp_postal_code")(df)

    @pa.dataframe_check(name="requires:insurance_policy_number")
    def _req_ins_policy(cls, df):
        return _block_requires("insurance", "insurance_policy_number")(df)

    @pa.dataframe_check(name="requires:insurance_plan_name")
    def _req_ins_plan(cls, df):
        return _block_requires("insurance", "insurance_plan_name")(df)


def _pcp_full_name_length(df: pd.DataFrame) -> pd.Series:
    parts = df[["pcp_first_name", "pcp_middle_name", "pcp_last_name"]]
    lengths = parts.apply(lambda s: s.str.len()).fillna(0).astype(int)
    spaces = parts.notna().sum(axis=1).sub(1).clip(lower=0)
    return lengths.sum(axis=1) + spaces


# ---- plain-English reasons --------------------------------------------------------------------

def _one_of(column: str, value: str, allowed) -> str:
    allowed = list(allowed)
    guess = difflib.get_close_matches(value, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    if allowed == list(vocab.STATES):
        return (f"{column} {value!r} is not a US state code LetsGetChecked accepts: use the two-letter "
                f"postal code, e.g. MA (DC and PR are allowed){hint}")
    return f"{column} {value!r} is not an allowed value (allowed: {', '.join(allowed)}){hint}"


def _length(limit: int) -> Callable[[str, str], str]:
    return lambda column, value: (
        f"{column} is {len(value)} characters; LetsGetChecked allows at most {limit}"
    )


def _dob_reason(column: str, value: str) -> str:
    if not _DATE.match(value):
        return f"{column} {value!r} is not a date in the form YYYY-MM-DD (e.g. 1980-04-23)"
    try:
        when = date.fromisoformat(value)
    except ValueError:
        return f"{column} {value!r} is not a real calendar date"
    if when >= date.today():
        return f"{column} {value!r} is not in the past; a date of birth must be before today"
    return f"{column} {value!r} is not a valid date of birth"


def _order_items_reason(column: str, value: str) -> str:
    try:
        parse_order_items(value)
    except OrderItemError as exc:
        return str(exc)
    return f"{column} cannot be read"


def _npi_reason(column: str, value: str) -> str:
    if not value.isdigit():
        return f"{column} {value!r} is not a whole number; an NPI is 10 digits"
    if len(value) != 10:
        return f"{column} has {len(value)} digits; an NPI has exactly 10"
    return f"{column} {value!r} fails the NPI check digit; check it for a typo"


def _requires_reason(check_name: str) -> Callable[[str, str], str]:
    column = check_name.split(":", 1)[1]
    block = next(b for b, (_, req, _) in BLOCKS.items() if column in req)
    what = BLOCKS[block][2]
    required = ", ".join(BLOCKS[block][1])
    return lambda _c, _v: (
        f"{column} is required when {what} is given (fill {required}, or leave all of its columns empty)"
    )


REASONS: dict[str, Callable[[str, str], str]] = {
    "not_nullable": lambda column, _v: f"{column} is required but empty",
    "phone_country_code_format": lambda column, value: (
        f"{column} {value!r} must be '+' followed by 1 to 4 digits, e.g. +1"
    ),
    "phone_number_format": lambda column, value: (
        f"{column} must be 4 to 15 digits, without the country code, spaces or dashes"
    ),
    "email_format": lambda column, value: f"{column} {value!r} is not an email address",
    "past_date": _dob_reason,
    "order_items_format": _order_items_reason,
    "npi": _npi_reason,
    "pcp_full_name": lambda column, value: (
        f"the primary care provider's first, middle and last names together are {value} "
        f"characters; LetsGetChecked requires fewer than 100"
    ),
}

def _statistics() -> dict[tuple[str, str], dict]:
    """(column, check name) -> the check's parameters (allowed values, length limits), read from
    the schema itself so the reasons can never disagree with the rules."""
    schema = OrderBatch.to_schema()
    return {
        (name, chk.name): dict(chk.statistics or {})
        for name, col in schema.columns.items()
        for chk in col.checks
    }


_STATS = _statistics()


def reason_for(check: str, column: str, value: str | None) -> str:
    """The sentence for one failed check on one cell."""
    value = "" if value is None else value
    check = check.split("(", 1)[0]  # pandera reports built-ins as e.g. "str_length(None, 35)"
    if check in REASONS:
        return REASONS[check](column, value)
    if check.startswith("requires:"):
        return _requires_reason(check)(column, value)
    stats = _STATS.get((column, check), {})
    if "allowed_values" in stats:
        return _one_of(column, value, stats["allowed_values"])
    if stats.get("max_value") is not None and check == "str_length":
        return _length(stats["max_value"])(column, value)
    return f"{column} {value!r} breaks the rule {check}"


SCHEMA = OrderBatch.to_schema()
