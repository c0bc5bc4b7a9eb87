"""One way to read a job spec from JSON (API bodies, batch files, profile exports, job records)."""

from __future__ import annotations

from typing import Any

from tasks.jobs.checks import InvalidSpec
from tasks.kinds import DEFAULT_KIND, kind_named

JobSpec = Any  # the spec dataclass of a registered job kind (`tasks.kinds`)


def parse_spec(data: Any, *, absolute: bool = False) -> JobSpec:
    """The job spec in `data` (a JSON object with a `kind`); InvalidSpec names what is wrong.

    `absolute=True` (specs from outside: HTTP, batch files, profiles) also requires local
    locations to be absolute paths: a relative one would be read relative to some worker's
    working directory."""
    if not isinstance(data, dict):
        raise InvalidSpec(f"a job spec must be a JSON object, got {type(data).__name__}")
    spec = kind_named(data.get("kind", DEFAULT_KIND)).parse(data)
    if absolute:
        for name in ("source", "activations", "output"):
            value = getattr(spec, name, None)
            if value is not None and not value.startswith(("s3://", "/")):
                raise InvalidSpec(f"{name} {value!r:.80} must be an s3:// URI or an absolute path")
    return spec
