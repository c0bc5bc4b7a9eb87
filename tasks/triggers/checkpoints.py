"""Where jobs come from: "checkpoint X of model Y is ready" → every export of Y's profile queued.

Hooks, Hugging Face webhooks and schedules all call `submit_checkpoint`. It goes through the
normal dedup path (content-derived job ids, HSETNX), so a hook delivered twice, a replayed
request, or a schedule firing on an unchanged checkpoint queues nothing new, and an export still
running is never started a second time.
"""

from __future__ import annotations

from typing import Any

from tasks.jobs import service
from tasks.jobs.records import JobRecords
from tasks.storage import sources
from tasks.triggers.profiles import Profile, ProfileError, load_profiles


def profile_named(name: str, profiles: dict[str, Profile] | None = None) -> Profile:
    """The profile `name` of the config (ProfileError listing the known ones if absent)."""
    profiles = load_profiles() if profiles is None else profiles
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none: set PORTER_CONFIG"
        raise ProfileError(f"no export profile {name!r:.80} (known: {known})")
    return profiles[name]


def submit_checkpoint(
    profile: Profile,
    checkpoint: str,
    iteration: str,
    records: JobRecords,
    *,
    trigger: str,
) -> list[dict[str, Any]]:
    """Queue every export of `profile` for `checkpoint` (all specs and sources checked before
    the first job is created). Returns per export: {export, job, created, output}."""
    expanded = profile.expand(checkpoint, iteration)
    labels = {
        "model": profile.model,
        "profile": profile.name,
        "iteration": iteration,
        "trigger": trigger,  # (notify URLs: the workers take them from the profile)
    }
    submitted = service.submit_many(
        [(spec, {**labels, "export": export.name}) for export, spec in expanded], records
    )
    return [
        {"export": export.name, "job": job, "created": created, "output": spec.output}
        for (export, spec), (job, created) in zip(expanded, submitted, strict=True)
    ]


def submit_latest(
    profile: Profile, root: str, records: JobRecords, *, trigger: str
) -> list[dict[str, Any]]:
    """Queue `profile`'s exports of the iteration `latest_checkpointed_iteration.txt` names under
    the training output `root`; an iteration already exported is skipped by dedup."""
    checkpoint, iteration = sources.latest_iteration(root)
    return submit_checkpoint(profile, checkpoint, iteration, records, trigger=trigger)
