"""Checks of untrusted job-spec input, shared by every job kind.

A spec is checked when it is made (`__post_init__`, `from_dict`): a job spec read from Redis or
written by hand is untrusted input. Locations are `s3://bucket/prefix` with a valid bucket and a
prefix that `tasks.storage.base.check_key` accepts, or local paths without `..`; no NUL or control
characters; sizes within bounds. Errors are `InvalidSpec` (a `ConversionError`, so the CLI prints
one line and exits 1).
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import PurePosixPath
from typing import Any

from converters.errors import ConversionError
from tasks.storage.base import InvalidKey, check_key

MAX_LOCATION_CHARS = 4096  # PATH_MAX
MAX_S3_PREFIX_BYTES = 900  # S3 keys are at most 1024 bytes, and file names follow the prefix
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3 bucket naming rules


class InvalidSpec(ConversionError, ValueError):
    """A job spec is malformed: unknown or missing fields, wrong types, values out of range,
    or a location that could escape where it points."""


def show(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut short: errors never echo a huge string back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def check_location(value: Any, what: str) -> str:
    """Return `value` if it is a safe SOURCE/OUTPUT location; raise InvalidSpec otherwise.

    `s3://bucket/prefix`: a valid bucket name and a prefix of safe key components (no `..`, `.`,
    empty component, backslash, reserved `.porter-` name). A local path: no `..` component (the
    CLI passes resolved absolute paths). Neither may hold NUL or other control characters."""
    if not isinstance(value, str):
        raise InvalidSpec(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidSpec(f"{what} is empty")
    if len(value) > MAX_LOCATION_CHARS:
        raise InvalidSpec(f"{what} is {len(value)} characters long (at most {MAX_LOCATION_CHARS})")
    if "\x00" in value:
        raise InvalidSpec(f"{what} {show(value)} contains a NUL byte")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidSpec(f"{what} {show(value)} contains a control character")
    if value.startswith("s3://"):
        bucket, _, prefix = value[len("s3://") :].partition("/")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise InvalidSpec(f"{what} {show(value)}: {show(bucket)} is not a valid S3 bucket name")
        if len(prefix.encode()) > MAX_S3_PREFIX_BYTES:
            raise InvalidSpec(
                f"{what} {show(value)}: the key prefix is longer than {MAX_S3_PREFIX_BYTES} bytes"
            )
        try:
            check_key(prefix.strip("/"), prefix=True)
        except InvalidKey as exc:
            raise InvalidSpec(f"{what} {show(value)}: {exc}") from None
        return value
    if "://" in value:
        raise InvalidSpec(f"{what} {show(value)}: only s3:// URIs and local paths are supported")
    if ".." in PurePosixPath(value).parts:
        raise InvalidSpec(f"{what} {show(value)} has a '..' component; give the resolved path")
    return value


def check_int(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int:
        raise InvalidSpec(f"{what} must be an integer, got {show(value)}")
    if not low <= value <= high:
        raise InvalidSpec(f"{what}={value} is out of range ({low}..{high})")
    return value


def check_bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise InvalidSpec(f"{what} must be true or false, got {show(value)}")
    return value


def check_fields(data: Any, cls: type, required: tuple[str, ...], what: str) -> dict[str, Any]:
    """`data` if it is a JSON object with only `cls`'s fields and all `required` ones."""
    if not isinstance(data, dict):
        raise InvalidSpec(f"{what} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(show(k, 40) for k in data if k not in known)
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise InvalidSpec(f"unknown field(s) in {what}: {', '.join(unknown[:5])}{more}")
    missing = [name for name in required if name not in data]
    if missing:
        raise InvalidSpec(f"{what} lacks {', '.join(missing)}")
    return data
