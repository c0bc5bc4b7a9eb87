"""Incoming hooks: "checkpoint X of model Y is ready" from training jobs and the Hugging Face Hub.

Training-complete (POST /v1/hooks/training-complete), signed with `tasks.triggers.signing`:

    {"profile": "llama-70b", "checkpoint": "s3://ckpts/llama-70b/iter_0003000", "iteration": 3000}

`iteration` selects that iteration's directory under a training output root (`iter_0003000`; it
must exist); a `checkpoint` that is an iteration directory must be that iteration (422 otherwise).
Left out, the iteration the root's `latest_checkpointed_iteration.txt` names is exported. Every
export of the profile is submitted.
A signature is accepted once: a replay inside the window gets the first answer back and submits
nothing (and, after the window, the timestamp check refuses it); dedup by job id stands behind it.

Hugging Face Hub (POST /v1/hooks/huggingface): the Hub sends its webhook secret as-is in
`X-Webhook-Secret` (no HMAC; compared in constant time). A `repo.content` update of a repo mapped
in a profile (`huggingface = {repo, checkpoint}`) exports `checkpoint` with {revision} = the new
head commit; other events are acknowledged and ignored. Replays resolve to the same job ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

import redis

from tasks.jobs.checks import InvalidSpec
from tasks.jobs.iterations import checkpoint_at
from tasks.jobs.locations import check_source
from tasks.jobs.records import JobRecords
from tasks.storage import sources
from tasks.triggers import checkpoints as triggers
from tasks.triggers.profiles import Profile, profile_for_repo
from tasks.triggers.signing import same_secret

_SEEN = "porter:hook:seen:"
_TRAINING_KEYS = {"profile", "checkpoint", "iteration"}


class HookRejected(InvalidSpec):
    """The hook's body is not a valid request (HTTP 422)."""


class HookInProgress(Exception):
    """The same signed request is being handled right now (HTTP 409)."""


MAX_JSON_DIGITS = 20  # no field of a Porter request needs a longer integer


def _json_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_JSON_DIGITS:
        raise HookRejected(f"the body has a {digits}-digit number (at most {MAX_JSON_DIGITS})")
    return int(text)


def _json_constant(name: str) -> Any:
    raise HookRejected(f"the body is not JSON: {name} is not a JSON value")


def parse_json(body: bytes) -> Any:
    """The JSON of a request body; HookRejected if it is not JSON, nests too deeply, or holds
    an integer longer than MAX_JSON_DIGITS, NaN or Infinity."""
    try:
        return json.loads(body, parse_int=_json_int, parse_constant=_json_constant)
    except RecursionError:
        raise HookRejected("the body is not JSON Porter reads: nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HookRejected(f"the body is not JSON: {exc}") from None


def _training_request(data: Any) -> tuple[str, str, int | str | None]:
    if not isinstance(data, dict):
        raise HookRejected("the body must be a JSON object")
    unknown = sorted(str(k)[:40] for k in set(data) - _TRAINING_KEYS)
    if unknown:
        raise HookRejected(f"unknown field(s): {', '.join(unknown)}")
    profile, checkpoint = data.get("profile"), data.get("checkpoint")
    if not isinstance(profile, str) or not isinstance(checkpoint, str):
        raise HookRejected("profile and checkpoint are required strings")
    iteration = data.get("iteration")
    if iteration is not None and (
        isinstance(iteration, bool) or not isinstance(iteration, int | str)
    ):
        raise HookRejected("iteration must be a number or a string")
    return profile, checkpoint, iteration


def training_complete(
    body: bytes, signature: str, profiles: dict[str, Profile], records: JobRecords, ttl: float
) -> tuple[dict[str, Any], bool]:
    """Submit the exports a verified training-complete hook asks for. Returns (answer, replayed).

    The signature is remembered for `ttl` seconds (longer than the replay window): the first
    request's answer is stored, and a replay gets it back without submitting anything."""
    key = _SEEN + hashlib.sha256(signature.encode()).hexdigest()
    if not records.redis.set(key, "", nx=True, ex=max(1, int(ttl))):
        stored = records.redis.get(key)
        if not stored:
            raise HookInProgress("this signed request is being handled; retry later")
        return json.loads(stored), True
    try:
        name, checkpoint, iteration = _training_request(parse_json(body))
        profile = triggers.profile_named(name, profiles)
        check_source(checkpoint, "checkpoint")  # before anything is read there (403)
        if iteration is None:
            checkpoint, iteration = sources.latest_iteration(checkpoint)
        else:  # that iteration's directory, which must exist (not whatever the tracker names)
            checkpoint, iteration = checkpoint_at(checkpoint, iteration)
        jobs = triggers.submit_checkpoint(
            profile, checkpoint, iteration, records, trigger="hook:training-complete"
        )
    except BaseException:
        records.redis.delete(key)  # not handled: the sender may retry with the same signature
        raise
    answer = {"profile": name, "checkpoint": checkpoint, "iteration": iteration, "jobs": jobs}
    with contextlib.suppress(redis.RedisError):  # queued anyway; a replay then gets 409
        records.redis.set(key, json.dumps(answer), xx=True, keepttl=True)
    return answer, False


def check_hub_secret(expected: str, given: str | None) -> bool:
    """The Hub's X-Webhook-Secret matches (constant time); never true when none is configured."""
    return same_secret(expected, given)


def huggingface(
    body: bytes, profiles: dict[str, Profile], records: JobRecords
) -> dict[str, Any] | None:
    """Submit the exports of a Hub `repo.content` update of a mapped repo; None if the event
    is not one Porter acts on (other scopes, unmapped repos)."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise HookRejected("the body must be a JSON object")
    event, repo = data.get("event") or {}, data.get("repo") or {}
    if not isinstance(event, dict) or not isinstance(repo, dict):
        raise HookRejected("event and repo must be objects")
    if event.get("scope") != "repo.content" or event.get("action") != "update":
        return None
    name, head = repo.get("name"), repo.get("headSha")
    profile = profile_for_repo(profiles, name) if isinstance(name, str) else None
    if profile is None:
        return None
    if not isinstance(head, str) or not head.isalnum() or not 7 <= len(head) <= 64:
        raise HookRejected("repo.headSha must be a commit hash")
    assert profile.hf_checkpoint is not None
    checkpoint = profile.hf_checkpoint.replace("{revision}", head)
    jobs = triggers.submit_checkpoint(
        profile, checkpoint, head[:12], records, trigger="hook:huggingface"
    )
    return {"profile": profile.name, "repo": name, "revision": head, "jobs": jobs}
