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
from typing import Any, Optional

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from schemas import vocab
from schemas.columns import (
    PATH_ID_CHARACTERS,
    PATH_ID_PATTERN,
    OrderItemError,
    is_custom,
    is_phi,
    parse_order_items,
    path_id_problem,
)

# The longest value each column may hold, in one table. LetsGetChecked documents four of them
# (DOCUMENTED_LENGTHS); the others are labsync's bounds for sane people and sane files: a first
# name of ten megabytes is a broken export, not a name. The README's contract table states the
# same numbers. `custom.*` covers every custom.<key> column.
MAX_LENGTH: dict[str, int] = {
    "client_order_id": 100,
    "program_code": 50,
    "participant_id": 100,
    "first_name": 50, "middle_name": 50, "last_name": 50,
    "email": 254,  # the longest address SMTP can carry
    "health_plan_name": 100,
    "address_line1": 35, "address_line2": 35,
    "city": 50,
    "order_items": 500, "diagnosis_codes": 500,
    "note": 1000,
    "physician_first_name": 50, "physician_middle_name": 50, "physician_last_name": 50,
    "pcp_id": 100, "pcp_first_name": 50, "pcp_middle_name": 50, "pcp_last_name": 50,
    "pcp_address_line1": 35, "pcp_address_line2": 35, "pcp_city": 50,
    "pcp_phone": 30, "pcp_phone2": 30, "pcp_fax": 30, "pcp_vendor_name": 100,
    "insurance_policy_number": 30, "insurance_plan_name": 100,
    "insurance_group_name": 100, "insurance_group_number": 50,
    "rupa_patient_id": 100,
    "custom.*": 500,
}
DOCUMENTED_LENGTHS = frozenset({"client_order_id", "address_line1", "address_line2",
                                "pcp_address_line1", "pcp_address_line2", "insurance_policy_number"})

MAX_CLIENT_ORDER_ID = MAX_LENGTH["client_order_id"]
MAX_ADDRESS_LINE = MAX_LENGTH["address_line1"]
MAX_POLICY_NUMBER = MAX_LENGTH["insurance_policy_number"]
MAX_PCP_FULL_NAME = 99  # "less than 100 characters"
MIN_DOB = date(1900, 1, 1)

_PHONE_CC = re.compile(r"^\+\d{1,4}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Python's \s spelled out as the characters themselves: pandas runs a pattern holding \s through
# Python's re one cell at a time (RE2's \s is ASCII-only); this one runs in pyarrow's RE2, with
# the same meaning in both engines.
WHITESPACE = "".join(chr(i) for i in range(0x3001) if chr(i).isspace())
_EMAIL = re.compile(rf"^[^@{WHITESPACE}]+@[^@{WHITESPACE}]+\.[^@{WHITESPACE}]+$")
_PHONE = re.compile(r"^[0-9]{4,15}$")
_ZIP = re.compile(r"[0-9]{5}(?:-[0-9]{4})?")  # [0-9], not \d: fullwidth digits are not a ZIP
_ZIP_LOST_ZERO = re.compile(r"(?P<head>[0-9]{3,4})(?P<tail>-[0-9]{4})?")

# What Excel does to a cell it takes for a number or a date (the Excel hints): they are matched
# on the text as the file has it, before any normalisation, and only ever explain a rejection.
_CC_WITHOUT_PLUS = re.compile(r"[0-9]{1,4}")  # +1 read as the number 1
_EXCEL_DATE = re.compile(r"[0-9]{1,2}[/.-][0-9]{1,2}[/.-](?:[0-9]{4}|[0-9]{2})")  # 2/11/1961
_SCIENTIFIC = re.compile(r"[0-9](?:[.,][0-9]+)?[eE]\+[0-9]{1,3}")  # 123456789012 shown as 1.23E+11
# id and number columns with no format rule of their own: scientific notation is the one thing
# labsync can tell is wrong with them (the digits past the first few are gone)
NUMBER_LIKE = ("participant_id", "pcp_id", "pcp_phone", "pcp_phone2", "pcp_fax",
               "insurance_policy_number", "insurance_group_number")
TEXT_TIP = "format the column as Text in Excel before typing, and save as 'CSV UTF-8'"

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
    return parsed.notna() & (parsed < pd.Timestamp(date.today())) & (parsed >= pd.Timestamp(MIN_DOB))


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


def _text(nullable: bool = True, *, column: str | None = None, **kw) -> Any:
    """A text column; with `column`, its length limit from MAX_LENGTH. Typed `Any` as pa.Field
    is: the field info is assigned to `Series[str]` class attributes."""
    if column is not None:
        kw["str_length"] = {"max_value": MAX_LENGTH[column]}
    return pa.Field(nullable=nullable, **kw)


class OrderBatch(pa.DataFrameModel):
    """One row per order. Column names are the CSV header; see schemas/columns.py."""

    client_order_id: Series[str] = _text(False, column="client_order_id")
    program_code: Series[str] = _text(False, column="program_code")
    participant_id: Series[str] = _text(False, column="participant_id")
    first_name: Series[str] = _text(False, column="first_name")
    middle_name: Series[str] = _text(column="middle_name")
    last_name: Series[str] = _text(False, column="last_name")
    email: Series[str] = _text(column="email")
    phone_country_code: Series[str] = _text(False)
    phone_number: Series[str] = _text(False)
    gender: Series[str] = _text(False, isin=list(vocab.GENDERS))
    dob: Series[str] = _text(False)
    ethnicity: Series[str] = _text(False, isin=list(vocab.ETHNICITIES))
    race: Series[str] = _text(False, isin=list(vocab.RACES))
    participant_language: Series[str] = _text(isin=list(vocab.LANGUAGES))
    health_plan_name: Series[str] = _text(column="health_plan_name")
    address_line1: Series[str] = _text(False, column="address_line1")
    address_line2: Series[str] = _text(column="address_line2")
    city: Series[str] = _text(False, column="city")
    state: Series[str] = _text(isin=vocab.STATES)
    postal_code: Series[str] = _text(False)
    country: Series[str] = _text(isin=list(vocab.COUNTRIES))
    order_items: Series[str] = _text(False, column="order_items")
    diagnosis_codes: Series[str] = _text(column="diagnosis_codes")
    note: Series[str] = _text(column="note")
    physician_first_name: Series[str] = _text(column="physician_first_name")
    physician_middle_name: Series[str] = _text(column="physician_middle_name")
    physician_last_name: Series[str] = _text(column="physician_last_name")
    physician_npi: Series[str] = _text()
    pcp_id: Series[str] = _text(column="pcp_id")
    pcp_first_name: Series[str] = _text(column="pcp_first_name")
    pcp_middle_name: Series[str] = _text(column="pcp_middle_name")
    pcp_last_name: Series[str] = _text(column="pcp_last_name")
    pcp_address_line1: Series[str] = _text(column="pcp_address_line1")
    pcp_address_line2: Series[str] = _text(column="pcp_address_line2")
    pcp_city: Series[str] = _text(column="pcp_city")
    pcp_state: Series[str] = _text(isin=vocab.STATES)
    pcp_postal_code: Series[str] = _text()
    pcp_country: Series[str] = _text(isin=list(vocab.COUNTRIES))
    pcp_phone: Series[str] = _text(column="pcp_phone")
    pcp_phone2: Series[str] = _text(column="pcp_phone2")
    pcp_fax: Series[str] = _text(column="pcp_fax")
    pcp_vendor_name: Series[str] = _text(column="pcp_vendor_name")
    insurance_policy_number: Series[str] = _text(column="insurance_policy_number")
    insurance_plan_name: Series[str] = _text(column="insurance_plan_name")
    insurance_hierarchy: Series[str] = _text(isin=list(vocab.INSURANCE_HIERARCHIES))
    insurance_group_name: Series[str] = _text(column="insurance_group_name")
    insurance_group_number: Series[str] = _text(column="insurance_group_number")
    # present only in files that have them: Optional, so a file without them is fine
    rupa_patient_id: Optional[Series[str]] = _text(column="rupa_patient_id")  # noqa: UP045
    custom: Optional[Series[str]] = pa.Field(  # noqa: UP045  (pandera reads Optional[...] here)
        alias=r"^custom\..+$", regex=True, nullable=True,
        str_length={"max_value": MAX_LENGTH["custom.*"]})

    class Config:
        strict = False  # custom.<key> and rupa_patient_id columns ride along
        coerce = False  # never coerce: a failed coercion would hide the column's other checks

    @pa.check("client_order_id", name="path_safe_id")
    def _path_safe_id(cls, s: Series[str]) -> Series[bool]:
        return s.str.fullmatch(PATH_ID_PATTERN) & ~s.str.contains("..", regex=False)

    @pa.check(*NUMBER_LIKE, name="not_scientific")
    def _not_scientific(cls, s: Series[str]) -> Series[bool]:
        if not s.str.contains("+", regex=False).any():  # 1.23E+11 has a '+'; most columns none
            return pd.Series(True, index=s.index)
        return ~s.str.fullmatch(_SCIENTIFIC.pattern)

    @pa.check("postal_code", "pcp_postal_code", name="us_zip")
    def _zip(cls, s: Series[str]) -> Series[bool]:
        return s.str.fullmatch(_ZIP.pattern)

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
    """The names joined by single spaces: their lengths, plus one space between two given."""
    parts = [df[c] for c in ("pcp_first_name", "pcp_middle_name", "pcp_last_name")]
    lengths = sum(p.str.len().fillna(0).to_numpy(dtype=np.int64) for p in parts)
    given = sum(p.notna().to_numpy(dtype=np.int64) for p in parts)
    return pd.Series(lengths + np.maximum(given - 1, 0), index=df.index)


# ---- plain-English reasons --------------------------------------------------------------------
# Each reason function takes (column, value, q): `value` is the cell as the file has it (what the
# sentence is chosen by), `q` how the sentence quotes it: " 'value'", or "" for a PHI column
# (schemas.columns.is_phi), whose value a reason never repeats, nor anything made from it. The
# reject report's `value` column and the fix file beside the batch show the cell to a person.

def _one_of(column: str, value: str, q: str, allowed) -> str:
    allowed = list(allowed)
    guess = difflib.get_close_matches(value, allowed, n=1, cutoff=0.6) if q else []
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    if allowed == list(vocab.STATES):
        return (f"{column}{q} is not a US state code LetsGetChecked accepts: use the two-letter "
                f"postal code, e.g. MA (DC and PR are allowed){hint}")
    return f"{column}{q} is not an allowed value (allowed: {', '.join(allowed)}){hint}"


def _length(column: str, value: str, _q: str = "") -> str:
    key = "custom.*" if is_custom(column) else column
    who = "LetsGetChecked" if key in DOCUMENTED_LENGTHS else "labsync"
    return f"{column} is {len(value)} characters; {who} allows at most {MAX_LENGTH[key]}"


def _path_id_reason(column: str, value: str, q: str) -> str:
    problem = path_id_problem(value) if q else "has a character that cannot travel in a URL"
    return (f"{column} {problem}: LetsGetChecked receives this id in the URL, "
            f"so use only {PATH_ID_CHARACTERS}")


def _zip_reason(column: str, value: str, q: str) -> str:
    lost = _ZIP_LOST_ZERO.fullmatch(value)
    if lost:
        fixed = lost.group("head").zfill(5) + (lost.group("tail") or "")
        example = f" (e.g. {fixed})" if q else " (put the zeros back in front: 5 digits)"
        return (f"{column}{q} looks like a ZIP code that lost its leading zero{example}: "
                f"Excel drops it when it reads the cell as a number; {TEXT_TIP}")
    return (f"{column}{q} is not a US ZIP code: use 5 digits or ZIP+4 with a dash "
            "(12345 or 12345-6789)")


def _dob_reason(column: str, value: str, q: str) -> str:
    if _EXCEL_DATE.fullmatch(value):
        return (f"{column}{q} is a date as Excel shows it (M/D/YYYY or D/M/YYYY: labsync does "
                f"not guess which); write it as YYYY-MM-DD, e.g. 1980-04-23, and {TEXT_TIP}")
    if not _DATE.match(value):
        return f"{column}{q} is not a date in the form YYYY-MM-DD (e.g. 1980-04-23)"
    try:
        when = date.fromisoformat(value)
    except ValueError:
        return f"{column}{q} is not a real calendar date"
    if when >= date.today():
        return f"{column}{q} is not in the past; a date of birth must be before today"
    if when < MIN_DOB:
        return f"{column}{q} is before {MIN_DOB.isoformat()}; check the year"
    return f"{column}{q} is not a valid date of birth"


def _order_items_reason(column: str, value: str, q: str) -> str:
    try:
        parse_order_items(value)
    except OrderItemError as exc:
        return str(exc) if q else f"{column} is not a list of CODE or CODE:QUANTITY (e.g. GLCS;FCIT:2)"
    return f"{column} cannot be read"


def _npi_reason(column: str, value: str, q: str) -> str:
    if not value.isdigit():
        return f"{column}{q} is not a whole number; an NPI is 10 digits"
    if len(value) != 10:
        return f"{column} has {len(value)} digits; an NPI has exactly 10"
    return f"{column}{q} fails the NPI check digit; check it for a typo"


def _requires_reason(check_name: str) -> Callable[[str, str, str], str]:
    column = check_name.split(":", 1)[1]
    block = next(b for b, (_, req, _) in BLOCKS.items() if column in req)
    what = BLOCKS[block][2]
    required = ", ".join(BLOCKS[block][1])
    return lambda _c, _v, _q: (
        f"{column} is required when {what} is given (fill {required}, or leave all of its columns empty)"
    )


def _phone_cc_reason(column: str, value: str, q: str) -> str:
    if _CC_WITHOUT_PLUS.fullmatch(value):
        example = f"+{value}" if q else "+1"
        return (f"{column}{q} has lost its '+' (it must be '+' followed by 1 to 4 digits): Excel drops "
                f"the + when it reads the cell as a number; write it with the + (e.g. {example}) and {TEXT_TIP}")
    return f"{column}{q} must be '+' followed by 1 to 4 digits, e.g. +1"


REASONS: dict[str, Callable[[str, str, str], str]] = {
    "not_nullable": lambda column, _v, _q: f"{column} is required but empty",
    "path_safe_id": _path_id_reason,
    "us_zip": _zip_reason,
    "str_length": _length,
    "phone_country_code_format": _phone_cc_reason,
    "phone_number_format": lambda column, _v, _q: (
        f"{column} must be 4 to 15 digits, without the country code, spaces or dashes"
    ),
    "email_format": lambda column, _v, q: f"{column}{q} is not an email address",
    "not_scientific": lambda column, value, q: _scientific_reason(column, value, q),
    "past_date": _dob_reason,
    "order_items_format": _order_items_reason,
    "npi": _npi_reason,
    "pcp_full_name": lambda column, value, _q: (  # `value`: the names' length, not a cell
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


MAX_QUOTED = 80  # a reason quotes at most this much of a value (the report's value column has it)


def _scientific_reason(column: str, value: str, q: str) -> str:
    return (f"{column}{q} is a long number in scientific notation: Excel shows long numbers "
            f"that way and saves only the first digits; type the full value again and {TEXT_TIP}")


def _quote(column: str, value: str) -> str:
    """How a reason quotes the cell: ` 'value'`, or nothing at all for a PHI column."""
    return "" if is_phi(column) else f" {value!r}"


def reason_for(check: str, column: str, value: str | None) -> str:
    """The sentence for one failed check on one cell. `value`: the cell as the file has it (the
    Excel hints recognise what Excel did to that text). A PHI column's value is never quoted."""
    value = "" if value is None else value
    check = check.split("(", 1)[0]  # pandera reports built-ins as e.g. "str_length(None, 35)"
    if check != "not_nullable" and _SCIENTIFIC.fullmatch(value):
        return _scientific_reason(column, value, _quote(column, value))  # whatever rule it broke, this is why
    if check == "str_length":
        return _length(column, value)  # counts the whole value
    if len(value) > MAX_QUOTED:
        value = value[: MAX_QUOTED - 1] + "…"
    q = _quote(column, value)
    if check in REASONS:
        return REASONS[check](column, value, q)
    if check.startswith("requires:"):
        return _requires_reason(check)(column, value, q)
    stats = _STATS.get((column, check), {})
    if "allowed_values" in stats:
        return _one_of(column, value, q, stats["allowed_values"])
    return f"{column}{q} breaks the rule {check}"


SCHEMA = OrderBatch.to_schema()
