"""Webhook signatures: HMAC over the raw body, compared in constant time.

One class serves both vendors because both schemes are "a header carries an encoded HMAC of
the body": LetsGetChecked's is published (`Authorization: LGC2-HMAC-SHA256 <base64>`, keyed
with the key string's ASCII bytes); Rupa's is not, so every part of it is a setting.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from etl.settings import WebhookSettings

LGC_SCHEME = "LGC2-HMAC-SHA256"


def split_keys(value: str | None) -> tuple[bytes, ...]:
    """`key1,key2` -> (b"key1", b"key2"): several keys are accepted while one is rotated."""
    return tuple(k.strip().encode("utf-8") for k in (value or "").split(",") if k.strip())


@dataclass(frozen=True)
class HmacVerifier:
    """`header` must hold `prefix + encode(HMAC(key, body))` for one of `keys`."""

    keys: Sequence[bytes] = field(repr=False)
    header: str
    algorithm: str = "sha256"
    encoding: str = "base64"  # base64 | hex
    prefix: str = ""

    def sign(self, body: bytes, key: bytes | None = None) -> str:
        """The header value a sender would put on `body` (tests and the sandbox use it)."""
        digest = hmac.new(key if key is not None else self.keys[0], body, self.algorithm).digest()
        encoded = base64.b64encode(digest).decode() if self.encoding == "base64" else digest.hex()
        return f"{self.prefix}{encoded}"

    def __call__(self, body: bytes, headers: Mapping[str, str]) -> bool:
        given = headers.get(self.header.lower()) or ""
        if not given.startswith(self.prefix):
            return False
        claimed = given[len(self.prefix):].strip()
        # compare the encoded forms, all of them, in constant time (no early exit on a match)
        ok = False
        for key in self.keys:
            expected = self.sign(body, key)[len(self.prefix):]
            if self.encoding == "hex":
                claimed, expected = claimed.lower(), expected.lower()
            ok |= hmac.compare_digest(claimed.encode(), expected.encode())
        return ok


Verifier = HmacVerifier


def lgc_verifier(settings: WebhookSettings) -> HmacVerifier | None:
    """LetsGetChecked's published scheme, when LGC_WEBHOOK_KEY is set (else no check)."""
    keys = split_keys(settings.lgc_key)
    if not keys:
        return None
    return HmacVerifier(keys, header="authorization", algorithm="sha256", encoding="base64",
                        prefix=f"{LGC_SCHEME} ")


def rupa_verifier(settings: WebhookSettings) -> HmacVerifier | None:
    """Rupa's scheme as configured (RUPA_WEBHOOK_*), when RUPA_WEBHOOK_SECRET is set."""
    keys = split_keys(settings.rupa_secret)
    if not keys:
        return None
    if settings.rupa_algorithm not in hashlib.algorithms_guaranteed:  # validated() says so too
        raise ValueError(f"unknown hash algorithm {settings.rupa_algorithm!r}")
    return HmacVerifier(keys, header=settings.rupa_header.lower(), algorithm=settings.rupa_algorithm,
                        encoding=settings.rupa_encoding, prefix=settings.rupa_prefix)
