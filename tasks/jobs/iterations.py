"""Which checkpoint an `iteration` names, the same for every trigger that may give one (hooks,
batches, POST /v1/jobs, schedules).

A training output root plus an iteration is that iteration's directory under the root
(`iter_0003000`, or `release`), which must exist; an iteration directory given together with a
different iteration is refused. So the iteration a job is labelled with, and announced as, is
the one it converts (before, a root plus `"iteration": 3000` converted whatever
`latest_checkpointed_iteration.txt` named, and was announced as 3000).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from converters.megatron.layout import iteration_dir_name
from tasks.jobs.checks import InvalidSpec, check_location, show
from tasks.jobs.locations import check_source
from tasks.jobs.specs import JobSpec, parse_spec
from tasks.kinds import DEFAULT_KIND, kind_named
from tasks.storage.store import open_store

_DIR = re.compile(r"^iter_(\d{1,18})$")
_NUMBER = re.compile(r"^\d{1,18}$")


def iteration_label(iteration: Any) -> str:
    """The canonical label of an iteration number or 'release' ("0003000" → "3000")."""
    text = iteration if isinstance(iteration, str) else None
    if type(iteration) is int and 0 <= iteration < 10**18:
        text = str(iteration)
    if text == "release":
        return text
    if text is None or not _NUMBER.fullmatch(text):
        raise InvalidSpec(
            f"iteration {show(iteration)} must be a Megatron iteration number or 'release'"
        )
    return str(int(text))


def _label_of_dir(name: str) -> str | None:
    """The iteration an iteration directory's name says, None if it is not one."""
    if name == "release":
        return name
    match = _DIR.fullmatch(name)
    return str(int(match.group(1))) if match else None


def _exists(location: str) -> bool:
    if location.startswith("s3://"):
        return bool(open_store(location + "/").list())
    return Path(location).is_dir()


def checkpoint_at(checkpoint: Any, iteration: Any) -> tuple[str, str]:
    """(location, label) of `iteration` of `checkpoint`: the iteration directory under a root
    (InvalidSpec if it does not exist), or `checkpoint` itself if it is that iteration's
    directory (InvalidSpec if it is another iteration's)."""
    label = iteration_label(iteration)
    check_location(checkpoint, "checkpoint")
    if not checkpoint.startswith(("s3://", "/")):
        raise InvalidSpec(f"checkpoint {show(checkpoint)} must be an s3:// URI or an absolute path")
    check_source(checkpoint, "checkpoint")  # before it is looked at: a 403 tells nothing
    base = checkpoint.rstrip("/")
    named = _label_of_dir(base.rsplit("/", 1)[-1])
    if named is not None:
        if named != label:
            raise InvalidSpec(
                f"checkpoint {show(checkpoint)} is iteration {named}, but iteration {label} "
                "was given; give the training output root, or the matching iteration"
            )
        return base, label
    name = iteration_dir_name(label, checkpoint)
    location = f"{base}/{name}"
    if not _exists(location):
        raise InvalidSpec(f"no iteration {label} under {show(checkpoint)} ({name}/ does not exist)")
    return location, label


def parse_job(data: Any) -> tuple[JobSpec, dict[str, str]]:
    """The job spec in a JSON object from outside (POST /v1/jobs, a batch entry) that may also
    give an `iteration`: then the kind's checkpoint field is pointed at that iteration
    (`checkpoint_at`). Returns the spec and the labels to store with the job
    ({"iteration": label}, or none)."""
    if not isinstance(data, dict) or "iteration" not in data:
        return parse_spec(data, absolute=True), {}
    data = dict(data)
    iteration = data.pop("iteration")
    field = kind_named(data.get("kind", DEFAULT_KIND)).checkpoint_field
    if field is None:
        raise InvalidSpec(f"kind {show(data.get('kind'))} takes no iteration")
    location, label = checkpoint_at(data.get(field), iteration)
    return parse_spec({**data, field: location}, absolute=True), {"iteration": label}
