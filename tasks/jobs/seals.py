"""Job records sealed by their submitter: an HMAC (key `PORTER_JOB_SECRET`) over what a job is.

Anyone who can write to Redis can write a job record. With a job secret configured, the submit
path (`JobRecords.create`, called by `tasks.jobs.service.submit_many` for every trigger) stores
`seal` = HMAC-SHA256 over the job id, its kind, its spec and the labels that steer what workers do
or announce (model, profile, export, iteration, trigger), and every step checks it before it
touches storage (`tasks.executors.celery.run_step`), as does the notify task. A record written or
changed by anything without the secret fails its job at the first step. Without a secret, records
are not sealed and not checked.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from converters.errors import ConversionError

SEALED_LABELS = ("model", "profile", "export", "iteration", "trigger")


class UnsealedJob(ConversionError):
    """A job record whose seal is missing or does not match: written without the job secret."""


def seal(secret: str, job: str, kind: str, spec: dict[str, Any], labels: dict[str, Any]) -> str:
    """The seal of a job record (hex HMAC-SHA256 of a canonical JSON of what it covers)."""
    covered = {
        "job": job,
        "kind": kind,
        "spec": spec,
        "labels": {name: labels.get(name) for name in SEALED_LABELS},
    }
    payload = json.dumps(covered, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def check_seal(secret: str, record: dict[str, Any]) -> None:
    """UnsealedJob unless `record` carries the seal `secret` makes (nothing to check without a
    secret)."""
    if not secret:
        return
    given = record.get("seal")
    expected = seal(secret, str(record.get("id")), str(record.get("kind")), record.get("spec"),
                    record)  # fmt: skip
    if not isinstance(given, str) or not hmac.compare_digest(given, expected):
        raise UnsealedJob(
            f"job {str(record.get('id'))[:80]}: its record is not sealed with PORTER_JOB_SECRET "
            "(written or changed by something other than Porter's submit path); refused"
        )
