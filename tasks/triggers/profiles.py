"""Export profiles: for a model, which exports to produce from each checkpoint, where they go and
who hears about it. A hook or a schedule then only says "checkpoint X of model Y is ready".

They live in the Porter config file (`PORTER_CONFIG`, TOML or YAML) under `profiles`:

    [profiles.llama-70b]
    output = "s3://exports/{model}/{iteration}/{export}"   # default output of every export
    notify = ["https://ci.example.com/porter-hook"]       # POSTed a signed summary per job
    huggingface = { repo = "acme/llama-70b", checkpoint = "s3://mirror/acme/llama-70b/{revision}" }

    [profiles.llama-70b.exports.trtllm-tp8]
    kind = "megatron-trtllm"          # a job spec (the JSON of POST /v1/jobs) ...
    tp = 8
    dtype = "bfloat16"                # ... without source/output: they default to the
                                      # checkpoint and the profile's output
    [profiles.llama-70b.exports.powerinfer-24g]
    kind = "powerinfer-index"
    activations = "{checkpoint}/activations"
    budgets = [{ vram_capacity = 25769803776, capacity = 212992 }]

Every string of an export may use {model}, {iteration}, {export} and {checkpoint}. Profiles are
checked when loaded (each export is expanded once with placeholder values), so a typo fails at
start-up with the file and the profile named, not when the first hook arrives.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.settings import read_config_file
from tasks.jobs.checks import InvalidSpec, check_location
from tasks.jobs.specs import JobSpec, parse_spec
from tasks.kinds import DEFAULT_KIND, all_kinds

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ITERATION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PLACEHOLDERS = {"model", "iteration", "export", "checkpoint"}
_PROFILE_KEYS = {"model", "output", "notify", "exports", "huggingface"}
PLACEHOLDER_CHECKPOINT = "s3://placeholder-bucket/checkpoint"  # expands templates at load time
MAX_EXPORTS = 64
MAX_NOTIFY = 8


class ProfileError(InvalidSpec):
    """A profile is malformed, unknown, or expands to an invalid job spec."""


@dataclass(frozen=True)
class Export:
    """One job of a profile: a name and a job-spec template."""

    name: str
    template: dict[str, Any]


@dataclass(frozen=True)
class Profile:
    """A model's exports, default output template, notification URLs and Hub mapping."""

    name: str
    model: str
    output: str | None
    notify: tuple[str, ...]
    exports: tuple[Export, ...]
    hf_repo: str | None = None
    hf_checkpoint: str | None = None

    def expand(self, checkpoint: str, iteration: str) -> list[tuple[Export, JobSpec]]:
        """The job spec of every export for `checkpoint` at `iteration` (all checked)."""
        check_iteration(iteration)
        check_location(checkpoint, "checkpoint")
        return [(export, self._expand(export, checkpoint, iteration)) for export in self.exports]

    def _expand(self, export: Export, checkpoint: str, iteration: str) -> JobSpec:
        values = {
            "model": self.model,
            "iteration": iteration,
            "export": export.name,
            "checkpoint": checkpoint.rstrip("/"),
        }
        data = _format(export.template, values)
        named = data.get("kind", DEFAULT_KIND)  # a list or a table is no kind: parse_spec says so
        kind = all_kinds().get(named) if isinstance(named, str) else None
        if kind is not None and kind.checkpoint_field:  # (an unknown kind: parse_spec says so)
            data.setdefault(kind.checkpoint_field, checkpoint)
        if "output" not in data and self.output is not None:
            data["output"] = _format(self.output, values)
        try:
            return parse_spec(data, absolute=True)
        except InvalidSpec as exc:
            raise ProfileError(f"profile {self.name!r}, export {export.name!r}: {exc}") from None


def check_iteration(iteration: str) -> str:
    """`iteration` if it is a safe path component (digits, a revision, 'release')."""
    if not isinstance(iteration, str) or not _ITERATION.fullmatch(iteration):
        raise ProfileError(
            f"iteration {iteration!r:.80} must be 1-64 letters, digits, '.', '_' or '-'"
        )
    return iteration


def _format(value: Any, values: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format_map(values)
    if isinstance(value, dict):
        return {k: _format(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_format(v, values) for v in value]
    return value


def _check_template(value: Any, where: str) -> None:
    """Every {placeholder} in the strings of `value` is a known one."""
    if isinstance(value, dict):
        for item in value.values():
            _check_template(item, where)
    elif isinstance(value, list):
        for item in value:
            _check_template(item, where)
    elif isinstance(value, str):
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as exc:
            raise ProfileError(f"{where}: bad template {value!r:.80}: {exc}") from None
        unknown = sorted(names - _PLACEHOLDERS)
        if unknown:
            raise ProfileError(
                f"{where}: unknown placeholder(s) {', '.join(unknown)} in {value!r:.80}; "
                f"known: {', '.join(sorted(_PLACEHOLDERS))}"
            )


def _profile(name: str, table: Any) -> Profile:
    where = f"profile {name!r}"
    if not _NAME.fullmatch(name):
        raise ProfileError(f"{where}: a name is letters, digits, '.', '_' or '-'")
    if not isinstance(table, dict):
        raise ProfileError(f"{where} must be a table")
    unknown = sorted(set(table) - _PROFILE_KEYS)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(unknown)}")
    exports_table = table.get("exports")
    if not isinstance(exports_table, dict) or not exports_table:
        raise ProfileError(f"{where} has no exports (a table of export name → job spec)")
    if len(exports_table) > MAX_EXPORTS:
        raise ProfileError(f"{where} has more than {MAX_EXPORTS} exports")
    exports = []
    for export_name, template in exports_table.items():
        if not _NAME.fullmatch(str(export_name)) or not isinstance(template, dict):
            raise ProfileError(f"{where}: export {export_name!r:.60} must be a named table")
        _check_template(template, f"{where}, export {export_name!r}")
        exports.append(Export(str(export_name), dict(template)))
    output = table.get("output")
    _check_template(output, f"{where}, output")
    notify = table.get("notify", [])
    if isinstance(notify, str):
        notify = [notify]
    if not isinstance(notify, list) or len(notify) > MAX_NOTIFY:
        raise ProfileError(f"{where}: notify must be a list of at most {MAX_NOTIFY} URLs")
    for url in notify:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ProfileError(f"{where}: notify URL {url!r:.80} must be http(s)://")
    hf = table.get("huggingface") or {}
    if not isinstance(hf, dict) or set(hf) - {"repo", "checkpoint"}:
        raise ProfileError(f"{where}: huggingface takes repo and checkpoint")
    if bool(hf.get("repo")) != bool(hf.get("checkpoint")):
        raise ProfileError(f"{where}: huggingface needs both repo and checkpoint")
    if hf and "{revision}" not in hf["checkpoint"]:
        raise ProfileError(f"{where}: huggingface checkpoint must contain {{revision}}")
    profile = Profile(
        name=name,
        model=str(table.get("model", name)),
        output=output,
        notify=tuple(notify),
        exports=tuple(exports),
        hf_repo=hf.get("repo"),
        hf_checkpoint=hf.get("checkpoint"),
    )
    profile.expand(PLACEHOLDER_CHECKPOINT, "1")  # fail now, not at the first hook
    return profile


def parse_profiles(data: dict[str, Any], where: str = "the Porter config") -> dict[str, Profile]:
    """The profiles of a config file's contents; ProfileError names `where` and the profile."""
    table = data.get("profiles", {})
    if not isinstance(table, dict):
        raise ProfileError(f"{where}: profiles must be a table of profile name → profile")
    try:
        return {name: _profile(name, value) for name, value in table.items()}
    except ProfileError as exc:
        raise ProfileError(f"{where}: {exc}") from None


def load_profiles(path: str | None = None) -> dict[str, Profile]:
    """The profiles of the file at `path` (default: `PORTER_CONFIG`; none → no profiles)."""
    path = path if path is not None else os.environ.get("PORTER_CONFIG")
    if not path:
        return {}
    try:
        data = read_config_file(Path(path))
    except ValueError as exc:
        raise ProfileError(str(exc)) from None
    return parse_profiles(data, str(path))


def profile_for_repo(profiles: dict[str, Profile], repo: str) -> Profile | None:
    """The profile whose `huggingface.repo` is `repo`, if any."""
    return next((p for p in profiles.values() if p.hf_repo == repo), None)
