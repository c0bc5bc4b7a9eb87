"""What a job kind declares: its spec, its inspect step, its phases and its publish.

A job kind is a small graph: inspect → one or more phases → publish. A phase is a fan-out of
independent steps (ranks, layers, shards; their count is the length of a list in the inspected
plan) followed by one step that needs them all. The executors (local process pool, Celery canvas),
the reaper, metrics and the CLI read these declarations and know nothing else of a kind.

Steps are plain functions of a `StepContext` (and, for a fan-out step, its index) that return a
small JSON-serialisable result; they never return tensors.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.queues import CPU_QUEUE
from tasks.jobs.checks import check_location

Progress = Callable[[int, int], None]


def human(n: float) -> str:
    """A byte count for people: `512 B`, `1.50 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_rate(n: float, seconds: float) -> str | None:
    """A transfer rate for people (`12.5 MiB/s`, in `human`'s units), or None when the run was
    too short or wrote nothing for a rate to mean anything (a tiny conversion: not "0.00 GB/s")."""
    if n <= 0 or seconds < 0.05:
        return None
    return f"{human(n / seconds)}/s"


def bytes_progress(record: dict[str, Any], step: str, plan: str) -> tuple[int, int]:
    """(bytes written so far, bytes to write) over the fan-out steps `{step}:i` of a job record,
    each planned as `inspected[plan][i]["bytes_written"]`."""
    entries = (record.get("inspected") or {}).get(plan, [])
    planned = {f"{step}:{i}": entry["bytes_written"] for i, entry in enumerate(entries)}
    done = 0
    for name, state in record.get("steps", {}).items():
        if name in planned:
            finished = state.get("state") == "SUCCEEDED"
            done += planned[name] if finished else int(state.get("done", 0))
    return done, sum(planned.values())


def local_location(text: str, what: str) -> str:
    """A location from the command line: an s3:// URI as given (checked: NUL, '..', bucket
    names); a local path resolved to an absolute one first (`../ckpt` is fine on a command line),
    then checked."""
    if text.startswith("s3://") or "\x00" in text:
        return check_location(text, what)
    return check_location(str(Path(text).resolve()), what)


@dataclass
class StepContext:
    """What a step of one job sees: the job, its spec, its record and earlier steps' results."""

    job: str
    spec: Any
    record: dict[str, Any]  # `inspected` (the plan) and what earlier steps remembered
    results: Callable[[], dict[str, dict[str, Any]]]  # finished steps' results, by step name
    remember_fields: Callable[..., None] = lambda **fields: None
    progress: Progress | None = None

    @property
    def inspected(self) -> dict[str, Any]:
        return self.record["inspected"]

    @property
    def tag(self) -> str:
        """The tag every artifact of this job carries (job id and source version)."""
        return self.inspected["tag"]

    def remember(self, **fields: Any) -> None:
        """Keep `fields` in the job record for the steps that follow (on any worker)."""
        self.record.update(fields)
        self.remember_fields(**fields)


@dataclass(frozen=True)
class Step:
    """A single step: its name in the job record and the function that runs it."""

    name: str
    run: Callable[[StepContext], dict[str, Any]]


@dataclass(frozen=True)
class Phase:
    """A fan-out of independent steps `{step}:{i}`, then the chord body that follows them.

    `task` and `body_task` are the Celery task names (kept stable: queued messages name them);
    `body_id` names the body in its Celery task id. The body runs `then` (if any), then the next
    enabled phase, or publishes the job after the last one."""

    step: str
    task: str
    count: str  # the key of the inspected plan whose list has one entry per fan-out step
    run: Callable[[StepContext, int], dict[str, Any]]
    body_task: str
    body_id: str
    then: Step | None = None
    queue: str = CPU_QUEUE
    enabled: Callable[[Any], bool] = lambda spec: True
    # (peak bytes held, bytes written) of step i, from the inspected plan: lets the local executor
    # run the steps in parallel processes sized by memory. None: one after another, in-process.
    cost: Callable[[dict[str, Any], int], tuple[int, int]] | None = None
    # None if this machine can run the phase's steps, else what it lacks ("cannot build engines:
    # no GPU"): a worker serving the phase's queue refuses to start on a reason.
    requires: Callable[[], str | None] | None = None

    def size(self, inspected: dict[str, Any]) -> int:
        """How many fan-out steps this phase has for the inspected plan."""
        return len(inspected.get(self.count, []))

    def names(self, inspected: dict[str, Any]) -> list[str]:
        return [f"{self.step}:{i}" for i in range(self.size(inspected))]


@dataclass(frozen=True)
class KindCli:
    """How the command line builds this kind's spec and shows its plan and results."""

    # Adds the kind's arguments for `convert`, `submit` or `plan` (the command is passed).
    add_arguments: Callable[[argparse.ArgumentParser, str], None]
    spec_from_args: Callable[[argparse.Namespace], Any]
    report: Callable[[Any, Any], None]  # the closing summary of `porter convert` (spec, Summary)
    print_plan: Callable[[dict[str, Any]], None] | None = None  # `porter plan KIND`
    # `porter convert KIND` when it is not the local executor's run of the phases.
    convert: Callable[[argparse.Namespace], int] | None = None
    describe: Callable[[dict[str, Any]], str] = lambda spec: f"-> {spec.get('output')}"
    help: str = ""


@dataclass(frozen=True)
class JobKind:
    """A registered job kind (see the module docstring)."""

    name: str
    spec_type: type  # a frozen dataclass with `kind`, `output`, `to_dict` and `from_dict`
    identity: Callable[[Any], list]  # the source identity from listings: [[name, size, version]]
    inspect: Callable[[Any], dict[str, Any]]  # metadata only: job_id, tag, source_digest, plan
    phases: tuple[Phase, ...]
    published: Callable[[StepContext], list[dict[str, Any]]]  # the files the manifest lists
    source_summary: Callable[[dict[str, Any]], dict[str, Any]]  # what the manifest says of SOURCE
    progress: Callable[[dict[str, Any]], tuple[int, int]]  # (done, total) from a job record
    cli: KindCli
    progress_unit: str = "bytes"  # "bytes" (scaled in progress bars), or what is counted
    after_publish: Callable[[StepContext], None] | None = None  # e.g. remove intermediates
    # The spec field an export profile fills with the checkpoint that triggered it, if any.
    checkpoint_field: str | None = None

    def parse(self, data: Any) -> Any:
        """The spec in `data` (its JSON form); InvalidSpec names what is wrong."""
        return self.spec_type.from_dict(data)

    def active_phases(self, spec: Any) -> list[Phase]:
        return [phase for phase in self.phases if phase.enabled(spec)]

    def step_names(self, inspected: dict[str, Any]) -> list[str]:
        """Every step a job of this kind can run, fan-out steps included (for revoking)."""
        names = ["plan"]
        for phase in self.phases:
            names += [phase.body_id, *phase.names(inspected)]
        return list(dict.fromkeys(names))
