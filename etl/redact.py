"""The one redaction point: what text labsync may store or show, and in what form.

Every writer of text that a person reads later calls `clean()`: log records (through
`etl.logs`), `lgc_orders.last_error` (through `etl.lgc.client.Outcome`), `sync_state.error`,
and the CLI views of those. `clean()`
- removes token-shaped strings: JWTs, `Bearer`/`Basic` credentials, secret query parameters and
  JSON fields, long hex or base64 runs (API keys). What a vendor echoes back is not ours to keep;
- escapes control characters, so a file name with a newline cannot forge a log line, an ANSI
  escape cannot repaint a terminal and a bidi control cannot reorder what a reader sees;
- caps the length.

Vendor errors are the other half. Their free text (`detail`, raw bodies) is never kept, because
vendors echo what they were sent: names, dates of birth, tokens. Only structured parts survive,
and only when they pass these tests:
- `fixed_text`: a title or type that looks like a fixed string of the vendor's code, not a
  sentence built from our data: bounded, printable, no quotes, no run of digits (ids, phones,
  ZIPs, years), nothing shaped like an email, a date or a token, and no word of the request it
  answers (accent- and case-folded, so `Zoe`/`ZOË` are caught for `Zoë`, short names included);
- `field_names`: the names of the fields it blames, when they are shaped like field paths and,
  if the caller knows the vendor's field names, made only of those.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Iterable

MASK = "***"
MAX_TEXT = 500

_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_SCHEME = re.compile(r"(?i)\b(bearer|basic|digest)(\s+)[A-Za-z0-9._~+/=-]{6,}")
_SECRET_PARAM = re.compile(
    r"(?i)([?&;](?:access_token|refresh_token|id_token|client_secret|code|token|key|api_key|apikey|"
    r"password|secret|signature|sig)=)[^&\s#\"']+")
_SECRET_FIELD = re.compile(
    r"(?i)([\"']?\b(?:access_token|refresh_token|id_token|client_secret|api_key|apikey|password|"
    r"passwd|secret|token)[\"']?\s*[:=]\s*[\"']?)(?!\*\*\*)[^\"'\s,;}&]+")
_HEX = re.compile(r"(?<![A-Za-z0-9])[0-9a-fA-F]{32,}(?![A-Za-z0-9])")
_B64 = re.compile(r"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_-]{32,}={0,2}(?![A-Za-z0-9+/_=-])")
_UUID = re.compile(r"^[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")
_BIDI_AND_INVISIBLE = set("\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                          "\u2066\u2067\u2068\u2069\u2028\u2029\u0085\ufeff")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _b64_secret(match: re.Match) -> str:
    """A long base64 run is a secret when it mixes upper case, lower case and digits, as random
    keys do; order-item UUIDs, file paths and long identifiers are left alone."""
    run = match.group(0)
    mixed = all(re.search(p, run) for p in (r"[A-Z]", r"[a-z]", r"\d"))
    return MASK if mixed and not _UUID.match(run) else run


def redact_tokens(text: str) -> str:
    """`text` with every token-shaped string replaced by `***`."""
    text = _JWT.sub(MASK, text)
    text = _SCHEME.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    text = _SECRET_PARAM.sub(lambda m: m.group(1) + MASK, text)
    text = _SECRET_FIELD.sub(lambda m: m.group(1) + MASK, text)
    text = _HEX.sub(MASK, text)
    return _B64.sub(_b64_secret, text)


def _is_control(ch: str) -> bool:
    return ch in _BIDI_AND_INVISIBLE or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")


def escape_controls(text: str) -> str:
    """Control, bidi and invisible characters as visible escapes (`\\n`, `\\x1b`, `\\u202e`)."""
    if text.isprintable():  # fast path (C): every character _is_control flags is unprintable
        return text
    if not any(_is_control(ch) for ch in text):
        return text
    out = []
    for ch in text:
        if not _is_control(ch):
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)


def clean(text: str | None, *, limit: int | None = MAX_TEXT) -> str | None:
    """The form in which any text is stored or shown: tokens removed, controls escaped, capped."""
    if text is None:
        return None
    text = escape_controls(redact_tokens(str(text)))
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


# ---- deciding which parts of a vendor's error may be kept ---------------------------------------
def fold(text: str) -> str:
    """Accent- and case-folded: `ZOË` -> `zoe`."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).casefold()


def mentions(text: str, values: Iterable[str]) -> bool:
    """Whether `text` contains any of `values` as a whole word, accent- and case-folded."""
    haystack = fold(text)
    for value in values:
        needle = fold(str(value)).strip()
        if len(needle) < 2:
            continue  # one letter (a middle initial, a quantity) would match everything
        if re.search(rf"(?<![0-9a-z]){re.escape(needle)}(?![0-9a-z])", haystack):
            return True
    return False


_EMAIL = re.compile(r"[^\s@]+@[^\s@]+")
_DATE = re.compile(r"\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}")
_QUOTES = set("'\"`‘’‚‛“”„‟«»‹›<>")


def fixed_text(value: object, values: Iterable[str] = (), *, max_len: int = 100,
               max_digits: int = 3, uri: bool = False) -> str | None:
    """`value` when it looks like a fixed string of the vendor's code, else None."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text or len(text) > max_len or any(_is_control(ch) for ch in text):
        return None
    if any(ch in _QUOTES for ch in text) or _EMAIL.search(text) or _DATE.search(text):
        return None
    if re.search(rf"\d{{{max_digits + 1},}}", text) or redact_tokens(text) != text:
        return None
    if uri and not re.fullmatch(r"about:blank|https?://[A-Za-z0-9.-]+(?::\d+)?(?:/[A-Za-z0-9._~/#%-]*)?|urn:[A-Za-z0-9:._-]+", text):
        return None
    if uri and "@" in text:
        return None
    words = text if not uri else re.sub(r"[/._#:-]+", " ", text)
    return None if mentions(words, values) else text


_FIELD = re.compile(r"^(?:[A-Za-z_$][A-Za-z0-9_$]*|\[\w+\])(?:(?:\.|/)?(?:[A-Za-z_$][A-Za-z0-9_$]*|\[\w+\]|\d+))*$")


def field_names(candidates: Iterable[object], values: Iterable[str] = (), *,
                known: Collection[str] | None = None, limit: int = 10) -> tuple[list[str], int]:
    """The candidates that are plainly field names, and how many others were left out.

    A field name is an ASCII path (`patientInfo.dob`, `orderItems[0].code`, `/data/attributes/
    email`) of at most 100 characters, no word of the request, and (with `known`, the vendor's
    field names, compared case-insensitively) only known components."""
    values = list(values)
    known_folded = {k.casefold() for k in known} if known is not None else None
    kept: list[str] = []
    dropped = 0
    for raw in candidates:
        name = raw.strip() if isinstance(raw, str) else ""
        path = name.lstrip("/$.")
        ok = 0 < len(name) <= 100 and _FIELD.match(path or "$") is not None
        if ok and known_folded is not None:
            parts = [p for p in re.split(r"[./\[\]]+", path) if p and not p.isdigit()]
            ok = all(p.casefold() in known_folded for p in parts)
        if ok and (mentions(name.replace(".", " ").replace("/", " "), values) or redact_tokens(name) != name):
            ok = False
        if not ok:
            dropped += 1
        elif name not in kept:
            kept.append(name)
    if len(kept) > limit:
        dropped += len(kept) - limit
        kept = kept[:limit]
    return kept, dropped
