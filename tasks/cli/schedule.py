"""`porter schedule add|list|remove` and `porter beat`: scheduled re-exports (tasks.triggers.schedules).

    porter schedule add NAME (--cron "0 3 * * *" | --every 10m) --profile PROFILE --source ROOT
                        [--replace]
    porter schedule list [--json]
    porter schedule remove NAME
    porter beat [--loglevel INFO] [--max-interval S] [--lock-timeout S]

ROOT is a training output (s3://bucket/prefix or an absolute path the workers see) holding
`latest_checkpointed_iteration.txt`; PROFILE is an export profile of the `PORTER_CONFIG` file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from converters.errors import ConversionError


def add_commands(commands: Any) -> None:
    """Register `schedule` and `beat` on the `porter` sub-command parser."""
    sched = commands.add_parser("schedule", help="re-export the latest checkpoint on a timetable")
    actions = sched.add_subparsers(dest="action", required=True)

    add = actions.add_parser("add", help="add a schedule (running beats pick it up)")
    add.add_argument("name", help="letters, digits, '.', '_' or '-'")
    when = add.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help="5 fields, UTC: minute hour day-of-month month day-of-week")
    when.add_argument("--every", help="interval: seconds, or 30s, 10m, 1h, 1d")
    add.add_argument("--profile", required=True, help="export profile of the PORTER_CONFIG file")
    add.add_argument(
        "--source",
        required=True,
        help="training output holding latest_checkpointed_iteration.txt: s3://... or an "
        "absolute path the workers see",
    )
    add.add_argument("--replace", action="store_true", help="change an existing schedule")

    listing = actions.add_parser("list", help="schedules and their last run")
    listing.add_argument("--json", action="store_true", help="as JSON (with the recent runs)")

    remove = actions.add_parser("remove", help="delete a schedule and its run history")
    remove.add_argument("name")

    beat = commands.add_parser(
        "beat", help="send scheduled runs (run several: one sends, the others stand by)"
    )
    beat.add_argument("--loglevel", default="INFO")
    beat.add_argument(
        "--max-interval", type=float, help="seconds between schedule checks (default 5)"
    )
    beat.add_argument(
        "--lock-timeout",
        type=int,
        help="seconds before a standby takes over from a beat that died (default 30)",
    )


def _time(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(round(ts), datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _result(item: dict[str, Any]) -> str:
    """One line about the last run: the error, or what was submitted and skipped."""
    if item["last_error"]:
        return f"error: {item['last_error']}".splitlines()[0][:100]
    result = item["last_result"]
    if not result:
        return "-"
    skipped = result.get("skipped", [])
    states = sorted({s["state"] or "?" for s in skipped})
    text = f"iteration {result.get('iteration')}: {len(result.get('submitted', []))} submitted"
    return text + (f", {len(skipped)} skipped ({'/'.join(states)})" if skipped else "")


def schedule(args: argparse.Namespace) -> int:
    """`porter schedule add|list|remove`."""
    from tasks.triggers import schedules

    if args.action == "add":
        return _add(args)
    if args.action == "remove":
        schedules.remove(args.name)
        print(f"removed schedule {args.name}")
        return 0
    items = schedules.list_()
    if args.json:
        for item in items:
            item["recent_runs"] = schedules.recent_runs(item["name"])
        print(json.dumps(items, indent=2, sort_keys=True))
        return 0
    if not items:
        print("no schedules (porter schedule add)")
        return 0
    print(
        f"{'name':<20} {'schedule':<18} {'profile':<16} {'last run (UTC)':<19}  "
        f"{'last result':<40}  source"
    )
    for item in items:
        print(
            f"{item['name']:<20} {item['schedule']:<18} {item['profile']:<16} "
            f"{_time(item['last_run']):<19}  {_result(item):<40}  {item['source']}"
        )
    return 0


def _add(args: argparse.Namespace) -> int:
    from tasks.storage import sources
    from tasks.triggers import schedules

    item = schedules.add(
        args.name,
        cron=args.cron,
        every=args.every,
        profile=args.profile,
        source=args.source,
        replace=args.replace,
    )
    verb = "replaced" if args.replace else "added"
    print(
        f"{verb} schedule {item['name']}: {item['schedule']} (UTC), profile {item['profile']}, "
        f"source {item['source']}; next run {_time(item['next_run'])}"
    )
    try:  # a hint only: training may not have written a checkpoint yet
        sources.latest_iteration(args.source)
    except (ConversionError, OSError) as exc:
        print(f"note: {exc}; runs record an error until it is there", file=sys.stderr)
    except Exception as exc:  # e.g. no S3 credentials here; the workers may have them
        print(
            f"note: could not check SOURCE from here: {type(exc).__name__}: {exc}", file=sys.stderr
        )
    return 0


def beat(args: argparse.Namespace) -> int:
    """`porter beat`: celery beat with redbeat's scheduler on Porter's app."""
    from config.celery_app import app

    if args.lock_timeout is not None:
        if args.lock_timeout < 1:
            raise ConversionError("--lock-timeout must be at least 1 second")
        app.conf.redbeat_lock_timeout = args.lock_timeout
    if args.max_interval is not None and args.max_interval <= 0:
        raise ConversionError("--max-interval must be positive")
    app.Beat(
        loglevel=args.loglevel,
        max_interval=args.max_interval,
        scheduler="redbeat.RedBeatScheduler",
    ).run()
    return 0
