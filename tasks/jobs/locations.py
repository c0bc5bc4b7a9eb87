"""Where queued jobs may read and write: the allow-lists `PORTER_ALLOWED_SOURCES` and
`PORTER_ALLOWED_OUTPUTS`, and one spelling per location. The only module that decides it.

- `normalise` gives a location one spelling (`//data/./ckpt/` → `/data/ckpt`): specs are
  normalised before their job id is computed, so no spelling slips past a list or defeats dedup.
- `admit` (the submit path of every trigger, `tasks.jobs.service.submit_many`) normalises a spec
  and checks it; `check_spec` checks again in the worker's plan step, where the files are. A local
  location is compared after resolving symlinks and `..` (`os.path.realpath`), by whole path
  components: `/data/a` allows `/data/a/x`, never `/data/ab`. An S3 location matches a listed
  `s3://bucket[/prefix]` by bucket, then by key components.
- `check_tree`: under a sources list, no symlink in a local checkpoint (tracker, iteration
  directory, rank files), activation directory or tokenizer directory may resolve outside the
  allowed roots.
- `write_routes_problem`: why `porter serve` keeps its job-changing calls closed, or None.
- `unrestricted`: what a worker with a list unset allows (its start-up WARNING), or None.

A list that is not set restricts nothing (the workers' own user and credentials are the limit);
`porter serve` refuses to open job-changing calls then, unless `PORTER_ALLOW_ANY_LOCATION=1`.
Refusals are `LocationRefused` (HTTP 403), naming the setting that refused.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from config.settings import Settings
from converters.errors import ConversionError

SOURCE_FIELDS = ("source", "activations", "tokenizer")  # spec fields that name what a job reads
OUTPUT_FIELDS = ("output",)  # ... and what it writes
SOURCES, OUTPUTS = "PORTER_ALLOWED_SOURCES", "PORTER_ALLOWED_OUTPUTS"


class LocationRefused(ConversionError):
    """A job would read or write outside the allow-lists (HTTP 403); `rule` names the setting."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


@dataclass(frozen=True)
class AllowList:
    """One allow-list: its setting's name and its roots (normalised), None when not set."""

    setting: str
    roots: tuple[str, ...] | None

    @classmethod
    def parse(cls, setting: str, text: str) -> AllowList:
        """The list in `text` (comma-separated); ValueError for a relative or odd entry."""
        entries = [entry.strip() for entry in text.split(",") if entry.strip()]
        if not entries:
            return cls(setting, None)
        roots = []
        for entry in entries:
            if not entry.startswith(("/", "s3://")) or "\x00" in entry:
                raise ValueError(f"{setting}: {entry!r:.80} is not an absolute path or s3:// URI")
            if ".." in entry.split("/"):
                raise ValueError(f"{setting}: {entry!r:.80} has a '..' component")
            roots.append(normalise(entry))
        return cls(setting, tuple(roots))

    def admits(self, location: str) -> bool:
        """Whether `location` (normalised) lies under one of the roots; True when not set."""
        if self.roots is None:
            return True
        if location.startswith("s3://"):
            return any(_under(_s3_parts(location), _s3_parts(r)) for r in self.roots if _s3(r))
        real = _parts(os.path.realpath(location))
        return any(_under(real, _parts(os.path.realpath(r))) for r in self.roots if not _s3(r))

    def describe(self) -> str:
        return ", ".join(self.roots or ())


def normalise(location: str) -> str:
    """One spelling of a location: empty and `.` components dropped, no trailing `/`
    (`//data/./ckpt/` → `/data/ckpt`; `s3://b/p/` → `s3://b/p`). `..` is kept, for the spec
    checks to refuse."""
    if location.startswith("s3://"):
        bucket, _, prefix = location[len("s3://") :].partition("/")
        prefix = prefix.rstrip("/")
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}/"
    parts = [p for p in location.split("/") if p not in ("", ".")]
    joined = "/".join(parts)
    return f"/{joined}" if location.startswith("/") else joined or "."


def normalise_spec(spec: Any) -> Any:
    """`spec` with every location field normalised (a new spec when anything changed)."""
    changes = {
        name: normalise(value)
        for name in SOURCE_FIELDS + OUTPUT_FIELDS
        if isinstance(value := getattr(spec, name, None), str) and normalise(value) != value
    }
    return dataclasses.replace(spec, **changes) if changes else spec


def lists(settings: Settings) -> tuple[AllowList, AllowList]:
    """(sources, outputs) of `settings`; both unset when `allow_any_location` is on."""
    if settings.allow_any_location:
        return AllowList(SOURCES, None), AllowList(OUTPUTS, None)
    return (
        AllowList.parse(SOURCES, settings.allowed_sources),
        AllowList.parse(OUTPUTS, settings.allowed_outputs),
    )


def check_spec(spec: Any, settings: Settings | None = None) -> None:
    """LocationRefused if a location of `spec` (normalised) lies outside its allow-list."""
    sources, outputs = lists(settings or Settings.from_env())
    for allow, names in ((sources, SOURCE_FIELDS), (outputs, OUTPUT_FIELDS)):
        for name in names:
            value = getattr(spec, name, None)
            if isinstance(value, str) and not allow.admits(normalise(value)):
                raise LocationRefused(
                    f"{name} {value!r:.200} is outside {allow.setting} ({allow.describe()})",
                    allow.setting,
                )


def admit(spec: Any, settings: Settings | None = None) -> Any:
    """The normalised `spec`, if its locations are allowed (LocationRefused otherwise)."""
    spec = normalise_spec(spec)
    check_spec(spec, settings)
    return spec


def check_source(location: str, what: str, settings: Settings | None = None) -> None:
    """LocationRefused if `location` (a checkpoint a hook or schedule names) is not an allowed
    source: checked before anything is read from it, so refusals say nothing of what exists."""
    sources, _ = lists(settings or Settings.from_env())
    if not sources.admits(normalise(location)):
        raise LocationRefused(
            f"{what} {location!r:.200} is outside {SOURCES} ({sources.describe()})", SOURCES
        )


def check_tree(
    *paths: str | os.PathLike[str], walk: bool = True, settings: Settings | None = None
) -> None:
    """Under a sources list, LocationRefused if any of `paths`, or (with `walk`) any symlink
    below a directory among them, resolves outside the allowed roots. The message names the
    link, never where it points. An `s3://` path has no links: it is skipped (`check_spec`
    checks the location itself)."""
    sources, _ = lists(settings or Settings.from_env())
    if sources.roots is None:
        return
    for path in map(os.fspath, paths):
        if _s3(path):
            continue
        _check_link(sources, path)
        for top, dirs, files in os.walk(path) if walk else ():
            for name in dirs + files:
                entry = os.path.join(top, name)
                if os.path.islink(entry):
                    _check_link(sources, entry)


def write_routes_problem(settings: Settings) -> str | None:
    """Why `porter serve` must keep its job-changing calls closed, or None when they may open."""
    if settings.allow_any_location:
        return None
    sources, outputs = lists(settings)
    missing = [a.setting for a in (sources, outputs) if a.roots is None]
    if not missing:
        return None
    return (
        f"job-changing calls are disabled: set {' and '.join(missing)} (comma-separated path "
        "prefixes and s3://bucket[/prefix]), or PORTER_ALLOW_ANY_LOCATION=1"
    )


def unrestricted(settings: Settings) -> str | None:
    """What a process with `settings` (a worker, `porter submit`) leaves unrestricted, or None
    when both lists are set: said once at a worker's start."""
    sources, outputs = lists(settings)
    missing = [a.setting for a in (sources, outputs) if a.roots is None]
    if not missing:
        return None
    what = "location" if len(missing) == 2 else "source" if missing == [SOURCES] else "output"
    why = "PORTER_ALLOW_ANY_LOCATION=1" if settings.allow_any_location else "not set"
    return (
        f"any {what} is allowed ({' and '.join(missing)}: {why}): jobs read and write wherever "
        f"this process's user and credentials reach; set {SOURCES} and {OUTPUTS} "
        "(comma-separated path prefixes and s3://bucket[/prefix]) to restrict them"
    )


def _check_link(sources: AllowList, path: str) -> None:
    if not sources.admits(normalise(path)):
        raise LocationRefused(
            f"{path}: resolves outside {sources.setting} ({sources.describe()}) through a symlink",
            sources.setting,
        )


def _s3(location: str) -> bool:
    return location.startswith("s3://")


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def _s3_parts(location: str) -> list[str]:
    return _parts(location[len("s3://") :])


def _under(parts: list[str], root: list[str]) -> bool:
    return parts[: len(root)] == root
