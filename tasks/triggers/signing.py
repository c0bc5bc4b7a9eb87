"""HMAC-SHA256 request signatures, one scheme for hooks Porter receives and notifications it sends.

    X-Porter-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>

The timestamp is signed with the body, so a captured request cannot be replayed after the window
(`hook_max_age`), and within it the receiver dedups. Secrets and signatures are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "X-Porter-Signature"
MAX_HEADER_CHARS = 512
_HEX = frozenset("0123456789abcdef")


class BadSignature(Exception):
    """The signature header is missing, malformed, wrong or outside the replay window."""


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header value for `body` at `timestamp` (default: now)."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def same_secret(expected: str, given: str | None) -> bool:
    """`given` equals `expected`, compared in constant time as UTF-8 bytes (a header with
    non-ASCII characters is simply wrong, not an error); never true when `expected` is empty."""
    if not expected or given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogateescape"))


def verify(secret: str, header: str | None, body: bytes, max_age: float) -> int:
    """Check `header` against `body`; returns its timestamp. BadSignature says why not (without
    echoing the header). The signed request is `sign(secret, body, timestamp)` whatever the
    header's spelling (order, extra parameters, leading zeros): key replay detection on that."""
    if not secret:
        raise BadSignature("hooks are disabled: no shared secret is configured")
    if not header:
        raise BadSignature(f"missing {HEADER} header")
    if len(header) > MAX_HEADER_CHARS:
        raise BadSignature(f"malformed {HEADER} header")
    parts = dict(p.strip().split("=", 1) for p in header.split(",") if "=" in p)
    t, given = parts.get("t", ""), parts.get("v1", "")
    if not t.isascii() or not t.isdigit() or len(t) > 12 or not given or set(given) - _HEX:
        raise BadSignature(f"malformed {HEADER} header: expected t=<unix seconds>,v1=<hex>")
    expected = sign(secret, body, int(t)).split("v1=", 1)[1]
    if not same_secret(expected, given):
        raise BadSignature("signature does not match the body")
    age = time.time() - int(t)
    if abs(age) > max_age:
        raise BadSignature(f"signature timestamp is {age:.0f} s off (allowed: {max_age:.0f} s)")
    return int(t)
