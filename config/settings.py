"""Porter's settings: one `Settings` object, from an optional TOML file and `PORTER_*` env vars.

Precedence: environment variable `PORTER_<FIELD>` > the file named by `PORTER_CONFIG` (TOML, or
YAML when it ends in .yaml/.yml; keys are the field names, at the top level or under a `porter`
table) > the defaults below. The same file holds export profiles (`config.profiles`). S3 is
configured through boto3's own standard configuration (`AWS_ENDPOINT_URL_S3`, credentials, region),
not here. Secrets (`*_secret`) are best given as environment variables; they never appear in a
repr or a log line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

HOUR = 3600


@dataclass(frozen=True)
class Settings:
    # Share of available RAM the local executor may plan to use for rank processes.
    memory_fraction: float = 0.8
    # Resident memory of a rank process besides its tensors, added to each rank's planned peak: a
    # conversion step needs Python and numpy (~45 MiB); a verify step also loads torch (~220 MiB).
    process_overhead_bytes: int = 400 * 2**20
    # Output bytes that make an extra rank process worth its start-up (~0.4 s: a fork server).
    bytes_per_worker: int = 2 * 2**30

    # Broker, result backend and job records (one Redis). `rediss://` for TLS.
    redis_url: str = "redis://localhost:6379/0"
    # Redis AUTH password, put into `redis_url` when that names none (deployments keep the URL in
    # plain config and the password in a secret).
    redis_password: str = field(default="", repr=False)
    # A task still running after this long is delivered again (acks_late): above the longest rank.
    visibility_timeout: int = 12 * HOUR
    # How often kombu looks for unacknowledged messages of dead workers to restore (seconds).
    unacked_restore_interval: int = 10
    unacked_restore_throttle: int = 10
    # Chord state and task results live this long in Redis: above the longest job.
    result_expires: int = 7 * 24 * HOUR
    # Job records are kept this long after a job ends.
    record_ttl: int = 30 * 24 * HOUR
    # A step delivered more often than this (its worker died each time) fails the job.
    max_deliveries: int = 3
    # Local cache of s3:// sources (sparse mirrors keyed by ETag); "" = ~/.cache/porter/sources.
    cache_dir: str = ""
    # Missing byte ranges of a source object closer than this are fetched with one GET.
    fetch_coalesce_bytes: int = 2**20
    # A running step writes a heartbeat this often (seconds)...
    heartbeat_interval: float = 5.0
    # ...and one silent for this long, whose worker does not answer a ping, is queued again at
    # once (instead of after the visibility timeout) by the reaper in the workers.
    stale_after: float = 30.0
    reaper_interval: float = 10.0
    # Seconds between progress writes of a running step.
    progress_interval: float = 0.5
    # Shortest `porter schedule add --every` (seconds): each run lists a training output and may
    # queue exports, so a schedule firing every second is a mistake (cron's finest is a minute).
    schedule_min_interval: float = 60.0

    # HTTP service (`porter serve`). Bearer token of the job-changing calls (POST /v1/jobs,
    # cancel, retry); "" disables them (reads, metrics and signed hooks still work).
    api_token: str = field(default="", repr=False)
    # Shared secret of the training-complete hook (HMAC-SHA256 of
    # the raw body); "" refuses every hook.
    hook_secret: str = field(default="", repr=False)
    # A signed hook older or newer than this (seconds) is refused: replay window.
    hook_max_age: float = 300.0
    # Hugging Face Hub webhook secret (sent as-is in X-Webhook-Secret); "" refuses them.
    hf_webhook_secret: str = field(default="", repr=False)
    # Largest request body the service reads (bytes); larger ones get 413.
    max_request_bytes: int = 2**20
    # Notifications: signing secret ("" sends them unsigned), attempts and first backoff.
    notify_secret: str = field(default="", repr=False)
    notify_attempts: int = 5
    notify_backoff: float = 2.0

    # Where queued jobs may read (SOURCE, activations, tokenizer) and write (OUTPUT): comma-separated
    # absolute path prefixes and `s3://bucket[/prefix]`, matched by whole path components after
    # symlinks and `..` are resolved (`tasks.jobs.locations`). "" = no list: anywhere the workers'
    # user and credentials reach. `porter serve` opens its job-changing calls only when both lists
    # are set or `allow_any_location` says so explicitly.
    allowed_sources: str = ""
    allowed_outputs: str = ""
    allow_any_location: bool = False
    # Key of the HMAC every job record carries over its spec and labels (made by the submitter,
    # checked by every step before it touches storage: `tasks.jobs.seals`). "" = records unsealed.
    job_secret: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.redis_password:
            object.__setattr__(
                self, "redis_url", _with_password(self.redis_url, self.redis_password)
            )

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from the defaults, the `PORTER_CONFIG` file and `PORTER_<FIELD>` variables."""
        values: dict[str, Any] = {}
        config_file = os.environ.get("PORTER_CONFIG")
        if config_file:
            values.update(_read_file(Path(config_file)))
        for f in fields(cls):
            raw = os.environ.get(f"PORTER_{f.name.upper()}")
            if raw is not None:
                values[f.name] = raw
        return cls(**{name: _coerce(cls, name, value) for name, value in values.items()})


def _with_password(url: str, password: str) -> str:
    """`url` with `password` in it (percent-encoded), unless it holds one already."""
    parts = urlsplit(url)
    if parts.password is not None or parts.hostname is None:
        return url
    user = quote(parts.username or "", safe="")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def read_config_file(path: Path) -> dict[str, Any]:
    """The Porter config file as a dict: TOML, or YAML for a .yaml/.yml name."""
    try:
        text = path.read_text()
        data = _yaml(text) if path.suffix in (".yaml", ".yml") else _toml(text)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"{path}: cannot read the Porter config file: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the Porter config file must be a table of settings")
    return data


# The parsers are imported when a config file is read: without one (`porter status`, `jobs`,
# `--help` on a workstation) neither yaml (≈10-30 ms) nor tomllib is loaded
# (tests/test_cli_imports.py).
def _toml(text: str) -> Any:
    import tomllib

    return tomllib.loads(text)


def _yaml(text: str) -> Any:
    """yaml.safe_load of `text` (an empty file is an empty table); a YAML error as ValueError."""
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from exc


def _read_file(path: Path) -> dict[str, Any]:
    data = read_config_file(path)
    table = data.get("porter", data)
    known = {f.name for f in fields(Settings)}
    unknown = sorted(k for k in table if k not in known and not isinstance(table[k], dict))
    if unknown:
        raise ValueError(f"{path}: unknown settings {', '.join(unknown)}")
    return {k: v for k, v in table.items() if k in known}


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _coerce(cls: type[Settings], name: str, value: Any) -> Any:
    kind = type(getattr(cls(), name))
    if kind is bool and isinstance(value, str):  # bool("0") would be True
        if value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"setting {name}: expected 1/0, true/false, yes/no, got {value!r:.40}")
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"setting {name}: expected {kind.__name__}, got {value!r}") from exc
