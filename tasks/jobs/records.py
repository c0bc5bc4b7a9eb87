"""Job records in Redis: state, per-step state and progress, bytes, timings, deliveries, error.

Keys (prefix `porter:`):
- `job:{id}` (hash): id, kind, state, spec (JSON), output, created/started/finished (unix s),
  error, attempt, source_digest, manifest_uri, engines.
- `job:{id}:steps` (sorted set): step names in the order they were first seen.
- `job:{id}:step:{name}` (hash): state, done, total, started, finished, seconds, deliveries,
  worker, error and the step's result fields (bytes_read, bytes_written, sha256, ...).
- `jobs` (sorted set): job ids by creation time; `running` (set): jobs in RUNNING, for the reaper.
- `job:{id}:ended` (pub/sub channel): a message when the job ends, for `--wait` (`watch_end`).
- `output:{sha256 of OUTPUT}` (string): the job holding OUTPUT, taken by its plan step
  (`claim_output`); another job's plan is refused while the holder has not ended.
- A running step's hash also holds `heartbeat` (unix s, refreshed every few seconds) and `node`
  (the Celery worker running it), which the reaper uses to find steps whose worker died.

Writes that only report progress are best-effort (`quiet=True`): a Redis restart must not fail a
step that is otherwise fine (pipeline spec).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from tasks.jobs.seals import seal

log = logging.getLogger(__name__)

PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "PENDING",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
    "CANCELLED",
)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
ACTIVE = (PENDING, RUNNING)  # not ended yet
_PREFIX = "porter:"

# Set state to ARGV[1] (with error ARGV[2], finished ARGV[3]) only while the job is not terminal:
# the first failure wins, and a cancelled job never turns FAILED or SUCCEEDED.
_FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'SUCCEEDED' or state == 'FAILED' or state == 'CANCELLED' then
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'error', ARGV[2], 'finished', ARGV[3])
return 1
"""


# Hold OUTPUT (KEYS[1]) for job ARGV[1] unless another job that has not ended holds it: returns
# {holder, state} then, nothing when ARGV[1] now holds it (ARGV[2]: job key prefix, ARGV[3]: TTL).
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  local state = redis.call('HGET', ARGV[2] .. holder, 'state')
  if state == 'PENDING' or state == 'RUNNING' then
    return {holder, state}
  end
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return false
"""


# Stored as plain strings (compared by the Lua script, set by HSETNX); every other field is JSON.
_RAW = frozenset({"id", "kind", "state", "error"})


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) if k in _RAW else json.dumps(v) for k, v in fields.items()}


def _decode(raw: dict[str, str]) -> dict[str, Any]:
    return {k: v if k in _RAW else json.loads(v) for k, v in raw.items()}


class JobRecords:
    """Read and write job records in one Redis database."""

    def __init__(
        self, url: str, *, ttl: int = 30 * 24 * 3600, retries: int = 20, secret: str = "",
        timeout: float | None = None,
    ) -> None:  # fmt: skip
        # Record writes ride out a Redis restart (AOF brings the data back): retried with backoff
        # (20 retries: about half a minute, for workers; a person at a terminal gets a few, see
        # `tasks.jobs.service.connect`). Progress writes (`quiet`) use a client that fails at once.
        # With `timeout` (interactive callers), a Redis that does not answer within it fails the
        # call at once: a hung server is not a restarting one (which refuses, and is retried).
        hung = {"supported_errors": (redis.ConnectionError,)} if timeout else {}
        patient = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=retries, **hung)
        self.redis = redis.Redis.from_url(
            url, decode_responses=True, health_check_interval=10, retry=patient,
            socket_timeout=timeout, socket_connect_timeout=timeout,
        )  # fmt: skip
        self._quiet = redis.Redis.from_url(
            url, decode_responses=True, retry=Retry(NoBackoff(), 0), socket_timeout=2
        )
        self.ttl = ttl
        self.secret = secret  # PORTER_JOB_SECRET: new records are sealed with it (`seals`)
        self._finish = self.redis.register_script(_FINISH)
        self._claim = self.redis.register_script(_CLAIM)

    @staticmethod
    def _job(job: str) -> str:
        return f"{_PREFIX}job:{job}"

    def _step(self, job: str, step: str) -> str:
        return f"{self._job(job)}:step:{step}"

    def create(self, job: str, kind: str, spec: dict[str, Any], **fields: Any) -> bool:
        """Create the record of `job` unless it exists; True if this call created it. Sealed
        (`tasks.jobs.seals`) when this connection has the job secret."""
        key = self._job(job)
        if not self.redis.hsetnx(key, "id", job):
            return False
        now = time.time()
        record = {"kind": kind, "state": PENDING, "spec": spec, "created": now, "attempt": 1}
        if self.secret:
            record["seal"] = seal(self.secret, job, kind, spec, fields)
        self.redis.hset(key, mapping=_encode({**record, "error": "", **fields}))
        self.redis.zadd(f"{_PREFIX}jobs", {job: now})
        return True

    def update(self, job: str, **fields: Any) -> None:
        """Set fields of the job record (values stored as JSON)."""
        self.redis.hset(self._job(job), mapping=_encode(fields))

    def get(self, job: str, *, steps: bool = True) -> dict[str, Any] | None:
        """The job record with its steps (in order), or None if there is none."""
        raw = self.redis.hgetall(self._job(job))
        if not raw:
            return None
        record = _decode(raw)
        if steps:
            record["steps"] = dict(self.steps(job))
        return record

    def state(self, job: str, *, quiet: bool = False) -> str | None:
        """The job's state, or None if there is no record (with `quiet`: also if Redis is
        unreachable right now, without waiting for it)."""
        if quiet:
            try:
                return self._quiet.hget(self._job(job), "state")
            except redis.RedisError:
                return None
        return self.redis.hget(self._job(job), "state")

    def steps(self, job: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(name, fields) of every step of the job, in the order they were first seen."""
        names = self.redis.zrange(f"{self._job(job)}:steps", 0, -1)
        pipe = self.redis.pipeline()
        for name in names:
            pipe.hgetall(self._step(job, name))
        for name, raw in zip(names, pipe.execute(), strict=True):
            yield name, _decode(raw)

    def job_ids(self, limit: int = 50) -> list[str]:
        """The most recent job ids whose records still exist, newest first (ids whose record
        expired are dropped from the index on the way)."""
        ids = self.redis.zrevrange(f"{_PREFIX}jobs", 0, limit - 1)
        pipe = self.redis.pipeline()
        for job in ids:
            pipe.exists(self._job(job))
        gone = [job for job, exists in zip(ids, pipe.execute(), strict=True) if not exists]
        if gone:
            self.redis.zrem(f"{_PREFIX}jobs", *gone)
        return [job for job in ids if job not in gone]

    def start(self, job: str) -> None:
        """Mark the job RUNNING (its plan step began)."""
        pipe = self.redis.pipeline()
        pipe.hset(self._job(job), mapping=_encode({"state": RUNNING, "started": time.time()}))
        pipe.sadd(f"{_PREFIX}running", job)
        pipe.execute()

    def new_attempt(self, job: str) -> int:
        """Queue the job again (retry): PENDING, error cleared, attempt counted; returns it."""
        key = self._job(job)
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping={"state": PENDING, "error": ""})
        pipe.hdel(key, "finished")
        pipe.hincrby(key, "attempt", 1)
        return int(pipe.execute()[-1])

    def finish(self, job: str, state: str, error: str = "") -> bool:
        """End the job in `state` unless it already ended; True if this call ended it."""
        now = json.dumps(time.time())
        done = bool(self._finish(keys=[self._job(job)], args=[state, error, now]))
        if done:
            self._ended(job)
        return done

    def force_state(self, job: str, state: str, error: str = "") -> None:
        """Set the state whatever it was (cancel, retry)."""
        self.redis.hset(self._job(job), mapping=_encode({"state": state, "error": error}))
        if state in TERMINAL:
            self._ended(job)

    @staticmethod
    def ended_channel(job: str) -> str:
        """The pub/sub channel on which a message says that `job` has just ended."""
        return f"{_PREFIX}job:{job}:ended"

    @contextlib.contextmanager
    def watch_end(self, job: str) -> Iterator[Callable[[float], bool]]:
        """Subscribe to `job`'s end; yields `ended(timeout)`, which returns True as soon as the
        end message arrives, False after `timeout` seconds without it (or when Redis dropped the
        subscription: the caller reads the record either way)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.ended_channel(job))
        except redis.RedisError:
            pubsub = None

        def ended(timeout: float) -> bool:
            if pubsub is not None:
                try:
                    return pubsub.get_message(timeout=timeout) is not None
                except redis.RedisError:
                    pass
            time.sleep(timeout)
            return False

        try:
            yield ended
        finally:
            if pubsub is not None:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()

    def _ended(self, job: str) -> None:
        """The job ended: not running any more (waiters hear it at once, `watch_end`); its keys
        expire after the TTL."""
        self.redis.srem(f"{_PREFIX}running", job)
        self.redis.publish(self.ended_channel(job), job)
        if self.ttl:
            names = self.redis.zrange(f"{self._job(job)}:steps", 0, -1)
            keys = [self._job(job), f"{self._job(job)}:steps"]
            keys += [self._step(job, n) for n in names]
            pipe = self.redis.pipeline()
            for key in keys:
                pipe.expire(key, self.ttl)
            pipe.execute()

    def claim_output(self, job: str, output: str) -> tuple[str, str] | None:
        """Make `job` the holder of `output` unless another job that has not ended (PENDING or
        RUNNING) holds it: then (that job, its state), and nothing changes."""
        held = self._claim(keys=[self._output(output)], args=[job, f"{_PREFIX}job:", self.ttl or 0])
        return (held[0], held[1]) if held else None

    @staticmethod
    def _output(output: str) -> str:
        return f"{_PREFIX}output:{hashlib.sha256(output.rstrip('/').encode()).hexdigest()}"

    def output_holder(self, job: str, output: str) -> tuple[str, str] | None:
        """(job, state) of another job holding `output` that has not ended, else None (a
        read-only look; `claim_output` decides)."""
        holder = self.redis.get(self._output(output))
        state = self.state(holder) if holder and holder != job else None
        return (holder, state) if holder and state in ACTIVE else None

    def mark_once(self, job: str, name: str) -> bool:
        """Set the flag `name` on the job; True only for the first caller."""
        return bool(self.redis.hsetnx(self._job(job), name, json.dumps(time.time())))

    def running_jobs(self) -> list[str]:
        """Jobs in RUNNING (started and not ended)."""
        return sorted(self.redis.smembers(f"{_PREFIX}running"))

    def stale_steps(self, older_than: float) -> list[tuple[str, str, dict[str, Any]]]:
        """(job, step, fields) of running steps whose last heartbeat is older than `older_than`
        seconds (their worker stopped beating: it died, or hangs)."""
        now, found = time.time(), []
        for job in self.running_jobs():
            for name, fields in self.steps(job):
                beat = fields.get("heartbeat") or fields.get("started")
                if fields.get("state") == RUNNING and beat and now - float(beat) > older_than:
                    found.append((job, name, fields))
        return found

    def step(self, job: str, step: str, *, quiet: bool = False, **fields: Any) -> None:
        """Record fields of a step (creating it); with `quiet`, Redis errors are logged, not raised."""
        try:
            pipe = (self._quiet if quiet else self.redis).pipeline()
            pipe.zadd(f"{self._job(job)}:steps", {step: time.time()}, nx=True)
            pipe.hset(self._step(job, step), mapping=_encode(fields))
            pipe.execute()
        except redis.RedisError as exc:
            if not quiet:
                raise
            log.warning("could not record progress of %s/%s: %s", job, step, exc)

    def count_delivery(self, job: str, step: str) -> int:
        """Count one more delivery of a step; returns the count."""
        self.redis.zadd(f"{self._job(job)}:steps", {step: time.time()}, nx=True)
        return int(self.redis.hincrby(self._step(job, step), "deliveries", 1))

    def reset_steps(self, job: str, names: list[str]) -> None:
        """Forget the delivery counts and errors of steps that are going to run again."""
        pipe = self.redis.pipeline()
        for name in names:
            pipe.hdel(self._step(job, name), "deliveries", "error")
        pipe.execute()
