"""Notifications: when a job ends SUCCEEDED or FAILED, POST a signed JSON summary to each URL of
its profile, retrying with exponential backoff.

What is signed is only what the worker can check (a Redis writer must not get Porter's signature
on a story of its own): the URLs come from the worker's own profile configuration (`urls`: the
record names only the profile), the job's spec and labels from its sealed record
(`tasks.jobs.seals`), and the outcome from OUTPUT itself (`summary`: SUCCEEDED only when
`manifest.json` there names this job, with the manifest's own URI and file count).

The body is JSON (`summary`), signed like hooks (`tasks.triggers.signing`, secret `PORTER_NOTIFY_SECRET`),
with `X-Porter-Event: job.finished` and `X-Porter-Delivery: <job>:<attempt>` so a receiver can
dedup. 5xx, 429 and network errors are retried (`notify_attempts`, `notify_backoff` doubling); any
other 4xx is final. A notification that cannot be delivered never changes the job's state: it is
recorded in the job record (`notifications`).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

from tasks.jobs.outputs import MANIFEST
from tasks.storage.store import open_store
from tasks.triggers.profiles import Profile
from tasks.triggers.signing import HEADER, sign

log = logging.getLogger(__name__)

TIMEOUT = 10.0
_SUMMARY_FIELDS = ("kind", "model", "profile", "export", "iteration", "trigger")
MAX_ERROR_CHARS = 500


class NotifyFailed(Exception):
    """A notification could not be delivered."""


def urls(record: dict[str, Any], profiles: dict[str, Profile]) -> tuple[str, ...]:
    """Where a finished job is announced: its profile's notify URLs in this process's
    configuration (none for a job without a profile, or a profile it does not know)."""
    profile = profiles.get(record.get("profile") or "")
    return profile.notify if profile is not None else ()


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """What a receiver is told about a finished job: its sealed spec and labels, and the outcome
    re-read from OUTPUT (`manifest.json` naming this job: SUCCEEDED; otherwise FAILED, with the
    record's error, cut short)."""
    output = (record.get("spec") or {}).get("output")
    store = open_store(output)
    manifest = store.get_json(MANIFEST)
    succeeded = isinstance(manifest, dict) and manifest.get("job_id") == record["id"]
    body: dict[str, Any] = {"job": record["id"], "state": "SUCCEEDED" if succeeded else "FAILED"}
    body.update({k: record.get(k) for k in _SUMMARY_FIELDS})
    body["manifest_uri"] = store.uri(MANIFEST) if succeeded else None
    body["files"] = len(manifest.get("files") or []) if succeeded else None
    body["output"] = output
    error = None if succeeded else str(record.get("error") or "no manifest of this job in OUTPUT")
    body["error"] = error if error is None else error[:MAX_ERROR_CHARS]
    body["attempt"] = record.get("attempt")
    body["finished"] = record.get("finished")
    return body


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _retryable(status: int) -> bool:
    return status >= 500 or status in (408, 429)


def deliver(
    url: str,
    payload: dict[str, Any],
    *,
    secret: str,
    attempts: int,
    backoff: float,
    delivery: str,
) -> int:
    """POST `payload` to `url`; returns the number of attempts it took. NotifyFailed after
    `attempts` retryable failures or one final (4xx) answer."""
    body = json.dumps(payload, sort_keys=True).encode()
    problem = ""
    for attempt in range(1, attempts + 1):
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "porter-notify/1",
            "X-Porter-Event": "job.finished",
            "X-Porter-Delivery": delivery,
        }
        if secret:
            headers[HEADER] = sign(secret, body)  # signed per attempt: a fresh timestamp
        try:
            status = _post(url, body, headers)
        except (OSError, ValueError) as exc:  # refused, DNS, timeout, malformed URL
            status, problem = 0, f"{type(exc).__name__}: {exc}"
        else:
            if 200 <= status < 300:
                return attempt
            problem = f"HTTP {status}"
            if not _retryable(status):
                break
        if attempt < attempts:
            delay = backoff * 2 ** (attempt - 1)
            log.warning("notification to %s failed (%s); retry in %.1f s", url, problem, delay)
            time.sleep(delay)
    raise NotifyFailed(f"{url}: {problem} (after {attempt} attempt(s))")
