"""HL7 v2 ORU^R01 lab results into observations, parsed with python-hl7 (`hl7` on PyPI).

    parse_oru(document: bytes) -> Report

The library does the syntax: the encoding characters each message declares in MSH-1/MSH-2 (an
unusual set such as `^~\\$` included), fields, repeats, components and sub-components, and escape
sequences (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\, \\.br\\ line breaks, \\Xhh\\). This module only maps
segments to observations, the same way for LetsGetChecked's 2.3 and Rupa's 2.5.1 messages:

- one Observation per OBX, in the order observation group (OBR) it follows; NTE segments after an
  OBR or OBX are that group's or that observation's notes;
- code and coding system from OBX-3 (identifier, text, system; the alternate triplet when the
  primary is not LOINC and the alternate is), value by OBX-2's type (NM numbers, SN comparator and
  number, CE/CWE the text or code, text types as sent, repeats joined), unit OBX-6, reference
  range OBX-7, abnormal flags OBX-8 (repeats kept), status OBX-11, time OBX-14 (else OBR-7, else
  MSH-7);
- interpretation normalised from OBX-8 (HL7 table 0078): normal / abnormal / critical / unknown.

Errors name no content: a document that is not an HL7 message raises Hl7Error with a plain reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
SYSTEMS = {"LN": LOINC, "LNC": LOINC, "LOINC": LOINC, "SCT": SNOMED, "SNM": SNOMED, "SNOMEDCT": SNOMED}

NORMAL, ABNORMAL, CRITICAL, UNKNOWN = "normal", "abnormal", "critical", "unknown"
SEVERITY = {UNKNOWN: 0, NORMAL: 1, ABNORMAL: 2, CRITICAL: 3}
# HL7 table 0078 (abnormal flags), 2.3 to 2.5.1, and the words labs put there
FLAG_INTERPRETATION = {
    "N": NORMAL, "NEG": NORMAL, "ND": NORMAL, "NR": NORMAL, "S": NORMAL,
    "H": ABNORMAL, "L": ABNORMAL, "A": ABNORMAL, "HU": ABNORMAL, "LU": ABNORMAL, "U": ABNORMAL,
    "D": ABNORMAL, "B": ABNORMAL, "W": ABNORMAL, "POS": ABNORMAL, "DET": ABNORMAL, "R": ABNORMAL,
    "I": ABNORMAL, "RR": ABNORMAL, "IND": ABNORMAL, "E": ABNORMAL, "EX": ABNORMAL,
    "HH": CRITICAL, "LL": CRITICAL, "AA": CRITICAL, ">": CRITICAL, "<": CRITICAL,
}
# the words a vendor's JSON uses (LetsGetChecked's `descriptor`)
WORD_INTERPRETATION = {
    "normal": NORMAL, "not detected": NORMAL, "negative": NORMAL, "in range": NORMAL,
    "high": ABNORMAL, "low": ABNORMAL, "abnormal": ABNORMAL, "detected": ABNORMAL,
    "positive": ABNORMAL, "out of range": ABNORMAL, "borderline": ABNORMAL,
    "critical": CRITICAL, "critical high": CRITICAL, "critical low": CRITICAL,
    "critically high": CRITICAL, "critically low": CRITICAL, "panic": CRITICAL,
}
CODED_TYPES = {"CE", "CWE", "CNE", "CF", "CV"}


class Hl7Error(ValueError):
    """The document is not an ORU message this module can read (the reason names no content)."""


@dataclass
class Observation:
    code: str | None
    code_system: str | None  # a URI for LOINC/SNOMED, else the system name as sent
    name: str | None
    value: str | None
    value_type: str | None
    numeric_value: float | None
    unit: str | None
    reference_range: str | None
    abnormal_flags: str | None
    interpretation: str
    status: str | None
    observed_at: datetime | None
    set_id: str | None = None  # OBX-1
    sub_id: str | None = None  # OBX-4
    local_code: str | None = None  # OBX-3.1 when the code kept is the alternate (LOINC) one
    notes: list[str] = field(default_factory=list)  # NTE after this OBX


@dataclass
class Group:
    """One OBR and the OBX (and NTE) that follow it."""
    placer_order: str | None
    filler_order: str | None
    test_code: str | None  # OBR-4.1
    test_name: str | None
    test_system: str | None
    observed_at: datetime | None  # OBR-7
    status: str | None  # OBR-25
    observations: list[Observation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    version: str | None  # MSH-12
    message_type: str | None  # MSH-9, e.g. ORU^R01
    control_id: str | None  # MSH-10
    sent_at: datetime | None  # MSH-7
    patient_id: str | None  # PID-3.1 (first repeat)
    groups: list[Group] = field(default_factory=list)

    @property
    def observations(self) -> list[tuple[Group, Observation]]:
        return [(g, o) for g in self.groups for o in g.observations]


def interpret(flags: list[str]) -> str:
    """The most severe reading among OBX-8's repeats; no flag (or none known) is unknown."""
    best = UNKNOWN
    for flag in flags:
        got = FLAG_INTERPRETATION.get(flag.strip().upper(), UNKNOWN)
        if SEVERITY[got] > SEVERITY[best]:
            best = got
    return best


def interpret_word(word: str | None) -> str:
    return WORD_INTERPRETATION.get((word or "").strip().casefold(), UNKNOWN)


_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?([+-]\d{4})?$")


def hl7_time(text: str | None) -> datetime | None:
    """An HL7 TS/DTM (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]); without an offset it is taken as UTC."""
    m = _TS.match((text or "").strip())
    if not m:
        return None
    y, mo, d, h, mi, s, frac, tz = m.groups()
    try:
        when = datetime(int(y), int(mo or 1), int(d or 1), int(h or 0), int(mi or 0), int(s or 0),
                        int((frac or "0").ljust(6, "0")[:6]))
    except ValueError:
        return None
    if tz:
        sign = 1 if tz[0] == "+" else -1
        offset = timedelta(hours=int(tz[1:3]), minutes=int(tz[3:5]))
        return when.replace(tzinfo=timezone(sign * offset)).astimezone(UTC)
    return when.replace(tzinfo=UTC)


def _number(text: str | None) -> float | None:
    try:
        value = float((text or "").strip())
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


# ---- the library's containers, read defensively ----------------------------------------------
def _field(segment, n: int):
    return segment[n] if n < len(segment) else None


def _is_str(x) -> bool:
    return isinstance(x, str)


def _reps(segment, n: int) -> list:
    """The repetitions of field n (each a list of components, or a plain string)."""
    f = _field(segment, n)
    if f is None or _is_str(f):
        return [f] if f else []
    return [r for r in f]


def _comp(rep, k: int) -> str:
    """Component k (1-based) of a repetition, its first sub-component; raw (still escaped)."""
    if rep is None:
        return ""
    if _is_str(rep):
        return rep if k == 1 else ""
    if k > len(rep):
        return ""
    c = rep[k - 1]
    if _is_str(c):
        return c
    return str(c[0]) if len(c) else ""


class _Reader:
    def __init__(self, message) -> None:
        self.m = message

    def text(self, raw: str | None) -> str | None:
        if raw is None:
            return None
        out = self.m.unescape(str(raw)).replace("\r\n", "\n").replace("\r", "\n")
        return out if out.strip() != "" else None

    def comp(self, segment, n: int, k: int = 1, rep: int = 0) -> str | None:
        reps = _reps(segment, n)
        return self.text(_comp(reps[rep], k)) if rep < len(reps) else None

    def whole(self, segment, n: int) -> str | None:
        """Field n as sent (repeats, components and all), unescaped."""
        f = _field(segment, n)
        return self.text(str(f)) if f is not None else None


def parse_oru(document: bytes | str) -> Report:
    """The observations of one ORU message (segments separated by CR, LF or CRLF)."""
    import hl7  # python-hl7

    text = document.decode("utf-8", "replace") if isinstance(document, bytes) else document
    text = text.lstrip("\ufeff\x0b").rstrip("\x1c\r\n ")
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    if not text.startswith("MSH") or len(text) < 8:
        raise Hl7Error("not an HL7 v2 message (it does not begin with an MSH segment)")
    try:
        message = hl7.parse(text)
    except Exception as exc:  # the library's own errors quote the document: keep only the class
        raise Hl7Error(f"the HL7 message could not be parsed ({type(exc).__name__})") from None
    r = _Reader(message)
    msh = message[0]
    # MSH: [0]=MSH, [1]=field separator, [2]=encoding characters, then MSH-3 at index 3
    report = Report(version=r.comp(msh, 12), message_type=_join(r.comp(msh, 9, 1), r.comp(msh, 9, 2)),
                    control_id=r.comp(msh, 10), sent_at=hl7_time(r.comp(msh, 7)), patient_id=None)
    group: Group | None = None
    last: Observation | None = None
    for segment in message[1:]:
        name = str(segment[0])
        if name == "PID" and report.patient_id is None:
            report.patient_id = r.comp(segment, 3, 1)
        elif name == "OBR":
            group = Group(placer_order=r.comp(segment, 2), filler_order=r.comp(segment, 3),
                          test_code=r.comp(segment, 4, 1), test_name=r.comp(segment, 4, 2),
                          test_system=r.comp(segment, 4, 3), observed_at=hl7_time(r.comp(segment, 7)),
                          status=r.comp(segment, 25))
            report.groups.append(group)
            last = None
        elif name == "OBX":
            if group is None:  # an OBX before any OBR: a group of its own
                group = Group(None, None, None, None, None, None, None)
                report.groups.append(group)
            last = _observation(r, segment, group, report)
            group.observations.append(last)
        elif name == "NTE":
            note = r.whole(segment, 3)
            if note is not None:
                (last.notes if last is not None else group.notes if group is not None else []).append(note)
    return report


def _join(a: str | None, b: str | None) -> str | None:
    return f"{a}^{b}" if a and b else a or b


def _observation(r: _Reader, obx, group: Group, report: Report) -> Observation:
    value_type = (r.comp(obx, 2) or "").upper() or None
    code, text, system = r.comp(obx, 3, 1), r.comp(obx, 3, 2), r.comp(obx, 3, 3)
    alt_code, alt_text, alt_system = r.comp(obx, 3, 4), r.comp(obx, 3, 5), r.comp(obx, 3, 6)
    local = None
    if SYSTEMS.get((system or "").upper()) != LOINC and alt_code and SYSTEMS.get((alt_system or "").upper()) == LOINC:
        local, code, system, text = code, alt_code, alt_system, text or alt_text
    value, numeric = _value(r, obx, value_type)
    flags = [r.text(_comp(rep, 1)) or "" for rep in _reps(obx, 8)]
    flags = [f for f in flags if f]
    unit = r.comp(obx, 6, 1) or r.comp(obx, 6, 2)
    return Observation(
        code=code, code_system=SYSTEMS.get((system or "").upper(), system), name=text or alt_text,
        value=value, value_type=value_type, numeric_value=numeric, unit=unit,
        reference_range=r.whole(obx, 7), abnormal_flags="~".join(flags) or None,
        interpretation=interpret(flags), status=(r.comp(obx, 11) or "").upper() or None,
        observed_at=hl7_time(r.comp(obx, 14)) or group.observed_at or report.sent_at,
        set_id=r.comp(obx, 1), sub_id=r.comp(obx, 4), local_code=local)


def _value(r: _Reader, obx, value_type: str | None) -> tuple[str | None, float | None]:
    reps = _reps(obx, 5)
    if not reps:
        return None, None
    if value_type == "NM":
        texts = [r.text(_comp(rep, 1)) for rep in reps]
        value = "; ".join(t for t in texts if t) or None
        return value, _number(value) if len(reps) == 1 else None
    if value_type == "SN":  # comparator ^ num1 ^ separator/suffix ^ num2
        rep = reps[0]
        comparator, n1, sep, n2 = (r.text(_comp(rep, k)) or "" for k in (1, 2, 3, 4))
        value = f"{comparator}{n1}{sep}{n2}".strip() or None
        return value, _number(n1) if comparator in ("", "=") and not sep and not n2 else None
    if value_type in CODED_TYPES:
        texts = [r.text(_comp(rep, 2)) or r.text(_comp(rep, 1)) for rep in reps]
        return "; ".join(t for t in texts if t) or None, None
    # text types and anything else: as sent (components kept), escapes resolved, repeats on lines
    texts = [r.text(str(rep)) for rep in reps]
    return "\n".join(t for t in texts if t) or None, None
