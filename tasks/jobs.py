"""Job specs and content-derived job ids.

A spec is checked when it is made (`ConvertSpec.__post_init__`, `ConvertSpec.from_dict`): a job
spec read from Redis or written by hand is untrusted input. Locations are `s3://bucket/prefix`
with a valid bucket and a prefix that `tasks.store.check_key` accepts, or local paths without
`..`; no NUL or control characters; sizes and parallelism within bounds. Errors are `InvalidSpec`
(a `ConversionError`, so the CLI prints one line and exits 1).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import PurePosixPath
from typing import Any

from converters.errors import ConversionError
from converters.model import DTYPES
from converters.trtllm.plan import NONFINITE_POLICIES, Target
from tasks.store import InvalidKey, check_key

FORMAT_VERSION = 1  # bump when the bytes Porter writes for the same input change

MAX_PARALLEL = 4096  # target TP x PP: far above any real deployment, far below a DoS
MAX_LOCATION_CHARS = 4096  # PATH_MAX
MAX_S3_PREFIX_BYTES = 900  # S3 keys are at most 1024 bytes, and file names follow the prefix
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3 bucket naming rules


class InvalidSpec(ConversionError, ValueError):
    """A job spec is malformed: unknown or missing fields, wrong types, values out of range,
    or a location that could escape where it points."""


def _show(value: Any, limit: int = 60) -> str:
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
        raise InvalidSpec(f"{what} {_show(value)} contains a NUL byte")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidSpec(f"{what} {_show(value)} contains a control character")
    if value.startswith("s3://"):
        bucket, _, prefix = value[len("s3://") :].partition("/")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise InvalidSpec(
                f"{what} {_show(value)}: {_show(bucket)} is not a valid S3 bucket name"
            )
        if len(prefix.encode()) > MAX_S3_PREFIX_BYTES:
            raise InvalidSpec(
                f"{what} {_show(value)}: the key prefix is longer than {MAX_S3_PREFIX_BYTES} bytes"
            )
        try:
            check_key(prefix.strip("/"), prefix=True)
        except InvalidKey as exc:
            raise InvalidSpec(f"{what} {_show(value)}: {exc}") from None
        return value
    if "://" in value:
        raise InvalidSpec(f"{what} {_show(value)}: only s3:// URIs and local paths are supported")
    if ".." in PurePosixPath(value).parts:
        raise InvalidSpec(f"{what} {_show(value)} has a '..' component; give the resolved path")
    return value


def check_int(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int:
        raise InvalidSpec(f"{what} must be an integer, got {_show(value)}")
    if not low <= value <= high:
        raise InvalidSpec(f"{what}={value} is out of range ({low}..{high})")
    return value


def _check_bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise InvalidSpec(f"{what} must be true or false, got {_show(value)}")
    return value


def porter_version() -> str:
    try:
        return version("porter")
    except PackageNotFoundError:  # running from a source tree
        return "0+source"


@dataclass(frozen=True)
class ConvertSpec:
    """A Megatron → TensorRT-LLM conversion: JSON-serialisable, the unit of work of a job."""

    source: str
    output: str
    tp: int
    pp: int = 1
    dtype: str | None = None
    parallel_embedding: bool = False
    engines: bool = False  # also build TensorRT-LLM engines (gpu queue)
    kind: str = "megatron-trtllm"
    # NaN/infinite weights: "warn" (listed in each rank's result) or "error" (the rank fails).
    nonfinite: str = "warn"

    def __post_init__(self) -> None:
        if self.kind != "megatron-trtllm":
            raise InvalidSpec(f"kind must be 'megatron-trtllm', got {_show(self.kind)}")
        check_location(self.source, "SOURCE")
        check_location(self.output, "OUTPUT")
        if self.output == self.source or self.output.startswith(self.source.rstrip("/") + "/"):
            raise InvalidSpec(f"OUTPUT {_show(self.output)} lies inside SOURCE")
        check_int(self.tp, "tp", 1, MAX_PARALLEL)
        check_int(self.pp, "pp", 1, MAX_PARALLEL)
        if self.tp * self.pp > MAX_PARALLEL:
            raise InvalidSpec(f"tp x pp = {self.tp * self.pp} ranks (at most {MAX_PARALLEL})")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InvalidSpec(f"dtype {_show(self.dtype)} is not one of {', '.join(DTYPES)}")
        _check_bool(self.parallel_embedding, "parallel_embedding")
        _check_bool(self.engines, "engines")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise InvalidSpec(
                f"nonfinite {_show(self.nonfinite)} is not one of {', '.join(NONFINITE_POLICIES)}"
            )

    @property
    def target(self) -> Target:
        return Target(
            tp=self.tp,
            pp=self.pp,
            dtype=self.dtype,
            parallel_embedding=self.parallel_embedding,
            nonfinite=self.nonfinite,
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["nonfinite"] == "warn":  # the default: job ids stay what they were before it
            del data["nonfinite"]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> ConvertSpec:
        """A spec from its JSON form; unknown, missing or mistyped fields are InvalidSpec."""
        return cls(**check_fields(data, cls, ("source", "output", "tp"), "the job spec"))


def check_fields(data: Any, cls: type, required: tuple[str, ...], what: str) -> dict[str, Any]:
    """`data` if it is a JSON object with only `cls`'s fields and all `required` ones."""
    if not isinstance(data, dict):
        raise InvalidSpec(f"{what} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(_show(k, 40) for k in data if k not in known)
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise InvalidSpec(f"unknown field(s) in {what}: {', '.join(unknown[:5])}{more}")
    missing = [name for name in required if name not in data]
    if missing:
        raise InvalidSpec(f"{what} lacks {', '.join(missing)}")
    return data


def identity_digest(identity: list) -> str:
    """A short digest of a source identity ([[name, size, version], ...])."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def job_id(spec: ConvertSpec, identity: list) -> str:
    """Same spec (destination included) + same source files (names, sizes, versions) + same Porter
    format = same id."""
    payload = {
        "spec": spec.to_dict(),
        "source": identity,
        "format_version": FORMAT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"{spec.kind}-{digest[:16]}"


def output_tag(job: str, identity_digest: str) -> str:
    """What every artifact of a job is tagged with: the job and the source version it was made from
    (a retry after the source was fixed must not reuse ranks made from the old bytes)."""
    return f"{job}.{identity_digest}"


_TAG = re.compile(r"^(?P<job>[a-z][a-z-]*-[0-9a-f]{16})\.(?P<digest>[0-9a-f]{16})$")


def tag_job(tag: str | None) -> str | None:
    """The job id inside an artifact tag written by `output_tag`, or None for anything else."""
    match = _TAG.match(tag or "")
    return match.group("job") if match else None


def tag_digest(tag: str) -> str | None:
    """The source identity digest inside an artifact tag written by `output_tag`."""
    match = _TAG.match(tag or "")
    return match.group("digest") if match else None


def task_id(job: str, step: str, attempt: int) -> str:
    """The Celery task id of a step: `{job}:{step}:{attempt}`. Deterministic, so a step can be
    revoked by name; new on every attempt, because revoked ids stay revoked in the workers."""
    return f"{job}:{step}:{attempt}"
