"""Allowed values for the order-batch CSV, in one place.

From the LetsGetChecked PUT Order document (../shared/seeds/004_…): US states (with DC and PR),
country (US only), race, insurance hierarchy.

The document names gender, ethnicity and participant language as restricted ("the following
values are allowed") but its published copy omits the lists. The lists below are our choice,
made to match the document's sample request (`Male`, `Hispanic`, `SPANISH`); the README says so.
Change them here, and only here, when LetsGetChecked confirms its lists.
"""

from __future__ import annotations

STATES = (
    "AK AL AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH "
    "NJ NM NY NC ND OH OK OR PA PR RI SC SD TN TX UT VT VA WA WV WI WY"
).split()

COUNTRIES = ("US",)

RACES = (
    "UnknownRace", "AmericanIndian", "NativeAlaskan", "Asian", "AfricanAmerican", "African",
    "Hispanic", "Latino", "PacificIslander", "NativeHawaiian", "Caucasian",
    "AshkenaziOrSephardiJewish", "OtherRace",
)

INSURANCE_HIERARCHIES = ("Unknown", "Primary", "Secondary", "Tertiary")

# --- our choice where the document's list is missing (case-agnostic on input) -----------------
GENDERS = ("Male", "Female", "Other", "Unknown")
ETHNICITIES = ("Hispanic", "NonHispanic", "UnknownEthnicity")
LANGUAGES = (
    "ENGLISH", "SPANISH", "CHINESE", "VIETNAMESE", "TAGALOG", "ARABIC", "FRENCH", "KOREAN",
    "RUSSIAN", "GERMAN", "HAITIAN_CREOLE", "PORTUGUESE", "POLISH", "ITALIAN", "JAPANESE", "OTHER",
)

# Case-agnostic fields: lower-cased input -> the canonical spelling sent to LetsGetChecked.
CANONICAL = {
    "gender": {v.lower(): v for v in GENDERS},
    "participant_language": {v.lower(): v for v in LANGUAGES},
}
