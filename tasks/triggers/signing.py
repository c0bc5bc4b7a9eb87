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


class BadSignature(Exception):
    """The signature header is missing, malformed, wrong or outside the replay window."""


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header value for `body` at `timestamp` (default: now)."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, header: str | None, body: bytes, max_age: float) -> int:
    """Check `header` against `body`; returns its timestamp. BadSignature says why not (without
    echoing the header)."""
    if not secret:
        raise BadSignature("hooks are disabled: no shared secret is configured")
    if not header:
        raise BadSignature(f"missing {HEADER} header")
    if len(header) > MAX_HEADER_CHARS:
        raise BadSignature(f"malformed {HEADER} header")
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    t, given = parts.get("t", ""), parts.get("v1", "")
    if not t.isascii() or not t.isdigit() or len(t) > 12 or not given:
        raise BadSignature(f"malformed {HEADER} header: expected t=<unix seconds>,v1=<hex>")
    expected = sign(secret, body, int(t)).split("v1=", 1)[1]
    if not hmac.compare_digest(expected, given):
        raise BadSignature("signature does not match the body")
    age = time.time() - int(t)
    if abs(age) > max_age:
        raise BadSignature(f"signature timestamp is {age:.0f} s off (allowed: {max_age:.0f} s)")
    return int(t)
