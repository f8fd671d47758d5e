"""The checkout return link, signed: the `return_url` labsync gives Rupa for an intents row
carries `sig`, an HMAC-SHA256 over the row id, so `GET /webhooks/rupa/return` (etl.webhooks.app)
only records returns for links labsync itself made.

The signing key is derived from the warehouse's Fernet key (etl.vault: LABSYNC_FERNET_KEY, else
an embedded SQLite warehouse's key file), so every deployment has one without a new setting:
HMAC-SHA256(the Fernet key's 32 bytes, b"labsync checkout return link"). The first Fernet key
signs; any of them verifies (a link made before a key rotation still works).

What is signed: the row id only. The order intent id does not exist yet when the link is made
(Rupa creates the intent from the request that carries the link), and the order id is appended
by Rupa on the way back, so neither can be covered; the apply step never moves a row already
linked to an order (etl.checkout.events).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import parse_qs, urlencode, urlsplit

from sqlalchemy import Engine

from etl.vault import key_file_for, parse_keys, vault_for

INFO = b"labsync checkout return link"
ROW_PARAM, SIG_PARAM = "row_id", "sig"


def link_keys(fernet_key: str | None, engine: Engine) -> list[bytes]:
    """The signing keys, one per Fernet key (the first signs), found where etl.vault.vault_for
    finds the Fernet keys. ConfigError when there is none (a server warehouse without a key)."""
    if fernet_key:
        keys = parse_keys(fernet_key)
    else:
        vault_for(None, engine)  # creates the embedded warehouse's key file, or raises ConfigError
        path = key_file_for(engine)
        assert path is not None  # vault_for raised otherwise
        keys = parse_keys(path.read_text().strip(), f"the key file {path.name}")
    return [hmac.new(base64.urlsafe_b64decode(k), INFO, hashlib.sha256).digest() for k in keys]


def _mac(key: bytes, row_id: str) -> bytes:
    return hmac.new(key, b"row_id\x00" + row_id.encode("utf-8"), hashlib.sha256).digest()


def sign(keys: list[bytes], row_id: str) -> str:
    """The signature of `row_id`'s return link (base64url, unpadded)."""
    return base64.urlsafe_b64encode(_mac(keys[0], row_id)).rstrip(b"=").decode()


def verify(keys: list[bytes], row_id: str, sig: str | None) -> bool:
    """Whether `sig` signs `row_id` under any of `keys` (constant time per key)."""
    if not sig or not row_id:
        return False
    try:
        given = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    except (ValueError, TypeError):
        return False
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(_mac(key, row_id), given)
    return ok


def is_return_link(return_url: str, row_id: str) -> bool:
    """Whether `return_url` is a return link for this row: its query names `row_id=<row_id>`,
    as labsync's return page wants (any other is the practitioner's own page)."""
    return parse_qs(urlsplit(return_url).query).get(ROW_PARAM) == [row_id]


def signed_return_url(return_url: str, row_id: str, keys: list[bytes]) -> str:
    """`return_url` with `sig=` for `row_id` appended (Rupa appends `order=` after it) when it is
    a return link for this row (is_return_link); any other return_url as it is."""
    if not is_return_link(return_url, row_id):
        return return_url
    sep = "&" if urlsplit(return_url).query else "?"
    return f"{return_url}{sep}{urlencode({SIG_PARAM: sign(keys, row_id)})}"
