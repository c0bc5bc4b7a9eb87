"""Scheduled re-exports: re-export the latest checkpoint of a training output on a timetable.

    porter schedule add llama-nightly --cron "0 3 * * *" --profile llama-70b \\
        --source s3://ckpts/llama-70b/
    porter schedule add llama-hourly --every 1h --profile llama-70b --source /mnt/train/llama
    porter schedule list [--json]
    porter schedule remove llama-nightly
    porter beat                       # run two or more (one per host): one sends, the rest wait

Each run reads `latest_checkpointed_iteration.txt` under SOURCE and submits every export of
PROFILE (from the `PORTER_CONFIG` file of the workers) through the normal dedup path
(`tasks.triggers.submit_latest`): an iteration already exported, or still being exported, gets no
new job ("skipped"), so an unchanged checkpoint costs one listing and a running export is never
started twice. A job that FAILED is skipped too: `porter retry` it.

`--cron` takes 5 fields (minute hour day-of-month month day-of-week) in UTC; `--every` takes
seconds or a unit: 30s, 10m, 1h, 1d, at least `PORTER_SCHEDULE_MIN_INTERVAL` (60 s). A new
schedule first runs at its next due time, not when it is added. Schedules live in Redis
(celery-redbeat), so they are added and removed while the beats run; `add --replace` changes an
existing one.

Beats: redbeat's lock in Redis lets one `porter beat` send; the others wait for the lock. One that
stops cleanly releases it at once; one that dies is replaced once its lock expires
(`redbeat_lock_timeout`, 30 s by default; `porter beat --lock-timeout`).

Every run is recorded, errors included (a missing tracker, an unknown profile): in the hash
`porter:schedule:NAME` (runs, errors, last_run, last_result JSON with iteration, submitted and
skipped jobs, last_error) and the list `porter:schedule:NAME:runs` (the latest runs, newest first).
A run that fails is not retried: the next one comes at the next due time. redbeat's own keys are
`porter:redbeat:NAME` (the entry), `porter:redbeat::schedule` and `porter:redbeat::lock`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from datetime import timedelta
from functools import cache
from typing import Any

import redis
from celery.schedules import crontab, schedule
from redbeat.schedulers import RedBeatSchedulerEntry, get_redis

from config.celery_app import CPU_QUEUE, app
from config.settings import Settings
from converters.errors import ConversionError
from tasks.jobs import locations, service
from tasks.jobs.checks import InvalidSpec, check_location
from tasks.jobs.records import JobRecords
from tasks.triggers import checkpoints as triggers

log = logging.getLogger(__name__)

TASK = "porter.scheduled_export"
RECENT_RUNS = 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_EVERY = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")


class ScheduleError(InvalidSpec):
    """A schedule is malformed, unknown, or already exists."""


# ---- parsing and validation -------------------------------------------------------------------


def check_name(name: str) -> str:
    """`name` if it is 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ScheduleError(
            f"schedule name {name!r:.80} must be 1-64 letters, digits, '.', '_' or '-'"
        )
    return name


def parse_cron(text: str) -> crontab:
    """A crontab from 5 fields (minute hour day-of-month month day-of-week), UTC."""
    fields = text.split()
    if len(fields) != 5:
        raise ScheduleError(
            f"--cron {text!r:.80} must have 5 fields: minute hour day-of-month month "
            f"day-of-week (e.g. '0 3 * * *'), got {len(fields)}"
        )
    for field, value in zip(_CRON_FIELDS, fields, strict=True):
        try:
            crontab(**{field: value})  # one field at a time, so the error can name it
        except Exception as exc:  # ValueError, celery's ParseException
            raise ScheduleError(f"--cron {text!r:.80}: bad {field} {value!r}: {exc}") from None
    return crontab(**dict(zip(_CRON_FIELDS, fields, strict=True)))


def parse_every(text: str, minimum: float) -> schedule:
    """An interval from seconds or a number with a unit: '30', '30s', '10m', '1h', '1d'; at
    least `minimum` seconds (`Settings.schedule_min_interval`)."""
    match = _EVERY.match(str(text).strip())
    if not match:
        raise ScheduleError(f"--every {text!r:.80} must be a number of seconds or 30s, 10m, 1h, 1d")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds < max(minimum, 1.0):
        raise ScheduleError(
            f"--every {text!r:.80} is shorter than {max(minimum, 1.0):g} s, the shortest interval "
            "allowed (PORTER_SCHEDULE_MIN_INTERVAL); use --cron for fixed times"
        )
    return schedule(timedelta(seconds=seconds))


def check_source(source: str) -> str:
    """`source` if it is an s3:// URI or an absolute path (beats and workers run elsewhere)."""
    check_location(source, "SOURCE")
    if not source.startswith("s3://") and not os.path.isabs(source):
        raise ScheduleError(
            f"SOURCE {source!r:.80} must be s3://bucket/prefix or an absolute path the workers see"
        )
    locations.check_source(source, "SOURCE")  # (each run is checked again when it submits)
    return source


def describe(when: Any) -> str:
    """'cron 0 3 * * *' or 'every 10m' for a schedule object."""
    if isinstance(when, crontab):
        return "cron " + " ".join(str(getattr(when, f"_orig_{f}")) for f in _CRON_FIELDS)
    if isinstance(when, schedule):
        seconds = when.run_every.total_seconds()
        for unit in ("d", "h", "m"):
            if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
                return f"every {seconds / _UNITS[unit]:g}{unit}"
        return f"every {seconds:g}s"
    return str(when)


# ---- Redis keys -------------------------------------------------------------------------------


def _redis() -> redis.Redis:
    """redbeat's client (decoded strings) on `redbeat_redis_url`."""
    return get_redis(app)


def entry_key(name: str) -> str:
    return RedBeatSchedulerEntry.generate_key(_conf_app(), name)


def stats_key(name: str) -> str:
    return f"porter:schedule:{name}"


def runs_key(name: str) -> str:
    return f"porter:schedule:{name}:runs"


def _conf_app() -> Any:
    from redbeat.schedulers import ensure_conf

    ensure_conf(app)
    return app


# ---- managing schedules -----------------------------------------------------------------------


def add(
    name: str,
    *,
    cron: str | None = None,
    every: str | None = None,
    profile: str,
    source: str,
    replace: bool = False,
) -> dict[str, Any]:
    """Store (or with `replace`, change) schedule `name`; running beats pick it up at their next
    tick. Everything is checked first, profile included; nothing is stored on an error."""
    check_name(name)
    if (cron is None) == (every is None):
        raise ScheduleError("give exactly one of --cron and --every")
    minimum = Settings.from_env().schedule_min_interval
    when = parse_cron(cron) if cron is not None else parse_every(every, minimum)
    triggers.profile_named(profile)
    check_source(source)
    client = _redis()
    exists = bool(client.exists(entry_key(name)))
    if exists and not replace:
        raise ScheduleError(f"schedule {name!r} already exists; --replace changes it")
    entry = RedBeatSchedulerEntry(
        name,
        TASK,
        when,
        args=[name],
        kwargs={"profile": profile, "source": source},
        options={"queue": CPU_QUEUE},
        app=_conf_app(),
    )
    # First run at the next due time (redbeat runs an entry without a last run at once); a
    # replaced entry keeps its last run (save() does not overwrite it).
    entry.last_run_at = app.now()
    if not exists:
        client.delete(stats_key(name), runs_key(name))
    entry.save()
    return get(name)


def remove(name: str) -> None:
    """Delete schedule `name` and its run history; a run already queued does nothing."""
    check_name(name)
    client = _redis()
    if not client.exists(entry_key(name)):
        raise ScheduleError(f"no schedule {name!r}")
    RedBeatSchedulerEntry(name, TASK, schedule(timedelta(seconds=1)), app=_conf_app()).delete()
    client.delete(stats_key(name), runs_key(name))


def get(name: str) -> dict[str, Any]:
    """Schedule `name` with its last outcome (ScheduleError if there is none)."""
    check_name(name)
    try:
        entry = RedBeatSchedulerEntry.from_key(entry_key(name), app=_conf_app())
    except KeyError:
        raise ScheduleError(f"no schedule {name!r}") from None
    return _describe_entry(entry, _redis().hgetall(stats_key(name)))


def list_() -> list[dict[str, Any]]:
    """Every Porter schedule (sorted by name) with its last outcome."""
    client = _redis()
    conf = _conf_app().redbeat_conf
    found = []
    for key in client.zrange(conf.schedule_key, 0, -1):
        try:
            entry = RedBeatSchedulerEntry.from_key(key, app=app)
        except KeyError:  # removed meanwhile
            continue
        if entry.task == TASK:
            found.append(_describe_entry(entry, client.hgetall(stats_key(entry.name))))
    return sorted(found, key=lambda s: s["name"])


def recent_runs(name: str, limit: int = RECENT_RUNS) -> list[dict[str, Any]]:
    """The latest recorded runs of `name`, newest first."""
    return [json.loads(r) for r in _redis().lrange(runs_key(name), 0, limit - 1)]


def _describe_entry(entry: RedBeatSchedulerEntry, stats: dict[str, str]) -> dict[str, Any]:
    due = entry.due_at
    return {
        "name": entry.name,
        "schedule": describe(entry.schedule),
        "profile": entry.kwargs.get("profile"),
        "source": entry.kwargs.get("source"),
        "next_run": due.timestamp() if due is not None else None,
        "runs": int(stats.get("runs", 0)),
        "errors": int(stats.get("errors", 0)),
        "last_run": float(stats["last_run"]) if stats.get("last_run") else None,
        "last_result": json.loads(stats["last_result"]) if stats.get("last_result") else None,
        "last_error": stats.get("last_error") or None,
    }


# ---- the scheduled task -----------------------------------------------------------------------


@cache
def _records() -> JobRecords:
    """This process's job records (redis-py reconnects after a fork)."""
    return service.connect()


def run_once(name: str, profile: str, source: str, records: JobRecords) -> dict[str, Any]:
    """Submit the exports of `profile` for the latest checkpoint under `source` and record the
    outcome of this run of schedule `name`. Never raises for a bad profile or source: the error
    is recorded and logged."""
    started = time.time()
    outcome: dict[str, Any] = {"run": started, "profile": profile, "source": source}
    try:
        found = triggers.submit_latest(
            triggers.profile_named(profile), source, records, trigger=f"schedule:{name}"
        )
    except ConversionError as exc:  # missing tracker, unknown profile, invalid spec or source
        outcome["error"] = str(exc)
        log.warning("schedule %s: run failed: %s", name, exc)  # routine: one line, no traceback
    except Exception as exc:  # S3 or Redis trouble: logged with its traceback, recorded
        outcome["error"] = f"{type(exc).__name__}: {exc}"
        log.exception("schedule %s: run failed", name)
    else:
        outcome.update(_summarize(found, records))
        log.info(
            "schedule %s: iteration %s, submitted %s, skipped %s",
            name,
            outcome["iteration"],
            outcome["submitted"] or "none",
            [s["job"] for s in outcome["skipped"]] or "none",
        )
    outcome["seconds"] = round(time.time() - started, 3)
    _record(records.redis, name, outcome)
    return outcome


def _summarize(found: list[dict[str, Any]], records: JobRecords) -> dict[str, Any]:
    """{iteration, submitted: [job], skipped: [{job, export, state}]} of submit_latest's answer."""
    submitted, skipped, iteration = [], [], None
    for item in found:
        record = records.get(item["job"], steps=False) or {}
        iteration = iteration or record.get("iteration")
        if item["created"]:
            submitted.append(item["job"])
        else:
            skipped.append(
                {"job": item["job"], "export": item["export"], "state": record.get("state")}
            )
    return {"iteration": iteration, "submitted": submitted, "skipped": skipped}


def _record(client: redis.Redis, name: str, outcome: dict[str, Any]) -> None:
    text = json.dumps(outcome, sort_keys=True)
    with client.pipeline() as pipe:
        pipe.hincrby(stats_key(name), "runs", 1)
        if "error" in outcome:
            pipe.hincrby(stats_key(name), "errors", 1)
        pipe.hset(
            stats_key(name),
            mapping={
                "last_run": str(outcome["run"]),
                "last_result": text,
                "last_error": outcome.get("error", ""),
            },
        )
        pipe.lpush(runs_key(name), text)
        pipe.ltrim(runs_key(name), 0, RECENT_RUNS - 1)
        pipe.execute()


@app.task(name=TASK, ignore_result=True)
def scheduled_export(name: str, profile: str, source: str) -> None:
    """One run of schedule `name` (sent by `porter beat`); a removed schedule does nothing."""
    records = _records()
    if not records.redis.exists(entry_key(name)):
        log.info("schedule %s was removed; this queued run does nothing", name)
        return
    run_once(name, profile, source, records)
