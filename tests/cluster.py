"""Real servers for the distributed tests: a redis-server on loopback (AOF on) and Porter worker
processes (`porter worker`, real Celery prefork workers) pointed at it and at moto's S3 server.

tests/conftest.py registers the fixtures `redis_url` and `cluster` for every test module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from tests.s3_server import ACCESS_KEY, REGION, SECRET_KEY

PORTER = str(Path(sys.executable).with_name("porter"))
NOTIFY_SECRET = "test-notify-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `check` until it returns something true; that value (TimeoutError naming `what`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_redis(
    data: Path, *options: str, password: str | None = None
) -> tuple[subprocess.Popen, str]:
    """A redis-server on a free loopback port with its files in `data`; (process, URL) once it
    answers. With `password`, it requires AUTH (`requirepass`) and the URL carries it."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed (tests/run.sh installs it)")
    port = free_port()
    auth = ["--requirepass", password] if password else []
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), *auth, *options],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://:{password}@127.0.0.1:{port}/0" if password else f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def ready() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_until(ready, 10, "redis-server")
    return proc, url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (AOF on, loopback only) for this test session (per xdist worker)."""
    options = ["--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction"]
    proc, url = start_redis(tmp_path_factory.mktemp("redis"), *options)
    yield url
    proc.terminate()
    proc.wait(10)


@contextlib.contextmanager
def serve(env: dict[str, str], log: Path | None = None) -> Iterator[str]:
    """`porter serve` on a free loopback port with `env`; yields its base URL once /healthz
    answers (any status), and stops it afterwards."""
    port = free_port()
    out = log.open("wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [PORTER, "serve", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"porter serve exited: {log.read_text() if log else ''}")
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=2).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    try:
        wait_until(answers, 30, "porter serve")
        yield base
    finally:
        proc.terminate()
        proc.wait(10)
        if log:
            out.close()


def worker_env(redis_url: str, s3_endpoint: str, cache: Path) -> dict[str, str]:
    """The environment of a worker (and of the submitting CLI) in these tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PORTER_"))}
    env.update(
        PORTER_REDIS_URL=redis_url,
        PORTER_UNACKED_RESTORE_INTERVAL="1",
        PORTER_UNACKED_RESTORE_THROTTLE="1",
        PORTER_PROGRESS_INTERVAL="0.05",
        # Production-like visibility timeout (the default, 12 h): recovery from a dead worker must
        # come from the heartbeats and the reaper, here with short periods.
        PORTER_HEARTBEAT_INTERVAL="0.5",
        PORTER_STALE_AFTER="3",
        PORTER_REAPER_INTERVAL="1",
        PORTER_CACHE_DIR=str(cache),
        PORTER_FETCH_COALESCE_BYTES="0",  # the fixtures are tiny: fetch exactly what is needed
        PORTER_NOTIFY_SECRET=NOTIFY_SECRET,  # workers sign notifications
        PORTER_NOTIFY_ATTEMPTS="3",
        PORTER_NOTIFY_BACKOFF="0.2",
        # The shared test cluster takes jobs anywhere (tests use tmp paths and fresh buckets);
        # tests/test_hardening_locations.py runs its own with allow-lists and a job secret.
        PORTER_ALLOW_ANY_LOCATION="1",
        AWS_ENDPOINT_URL_S3=s3_endpoint,
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION=REGION,
        AWS_CONFIG_FILE=str(cache / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(cache / "no-aws-credentials"),
        NO_PROXY="127.0.0.1,localhost",
    )
    return env


@dataclass
class Cluster:
    """Redis, S3 and running worker processes; `env` is what a client process needs."""

    redis_url: str
    env: dict[str, str]
    logs: Path
    cache: Path
    workers: list[subprocess.Popen] = field(default_factory=list)
    _started: dict[int, tuple] = field(default_factory=dict)
    _launched: int = 0

    @property
    def config(self) -> Path:
        """The workers' PORTER_CONFIG (profiles: their notify URLs are read from it)."""
        return Path(self.env["PORTER_CONFIG"])

    def start_worker(
        self, queues: str = "cpu", concurrency: int = 1, *, command: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen:  # fmt: skip
        """Start `porter worker` (or `command`) with this cluster's environment (plus `env`)."""
        index, self._launched = self._launched, self._launched + 1
        log = open(self.logs / f"worker-{index}.log", "wb")  # noqa: SIM115
        # Each worker has a cache of its own, as on separate machines.
        cache = str(self.cache / f"worker-{index}")
        proc = subprocess.Popen(
            command or [PORTER, "worker", "--queues", queues, "--concurrency", str(concurrency)],
            env={**self.env, "PORTER_CACHE_DIR": cache, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(proc)
        self._started[proc.pid] = (queues, concurrency, command, env)
        return proc

    def revive(self, wait: bool = True) -> None:
        """Replace workers that exited (killed by a test, or stopped by the pool watchdog), so
        every test starts with the cluster it expects."""
        dead = [proc for proc in self.workers if proc.poll() is not None]
        for proc in dead:
            self.workers.remove(proc)
            queues, concurrency, command, env = self._started.pop(proc.pid)
            self.start_worker(queues, concurrency, command=command, env=env)
        if dead and wait:
            self.wait_for_workers(len(self.workers))

    @contextlib.contextmanager
    def supervised(self, interval: float = 0.5) -> Iterator[None]:
        """Restart workers that exit while the block runs, as Kubernetes or systemd would (the
        pool watchdog stops a wedged worker and relies on that)."""
        done = threading.Event()

        def supervise() -> None:
            while not done.wait(interval):
                self.revive(wait=False)

        thread = threading.Thread(target=supervise, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def log_tails(self, chars: int = 3000) -> str:
        """The end of every worker's log, for a failure message."""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
            for p in sorted(self.logs.iterdir())
        )

    def wait_for_workers(self, count: int, timeout: float = 60) -> None:
        from celery import Celery

        app = Celery(broker=self.redis_url)

        def ready() -> bool:
            replies = app.control.ping(timeout=0.5) or []
            return len(replies) >= count

        wait_until(ready, timeout, f"{count} worker(s) to answer")

    def signal_workers(self, sig: int) -> None:
        """Send `sig` to every worker process and its pool children."""
        for proc in self.workers:
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)]:
                p.send_signal(sig)

    def porter(self, *args: str, timeout: float = 120, check: bool = False):
        """Run the `porter` CLI as a client of this cluster."""
        return subprocess.run(
            [PORTER, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def stop_worker(self, proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        """Stop a worker (its whole process group) and forget it."""
        os.killpg(proc.pid, sig)
        proc.wait(30)
        self.workers.remove(proc)

    def worker_of(self, pid: int) -> subprocess.Popen:
        """The worker whose process (or pool child) has `pid`."""
        for proc in self.workers:
            family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(True))]
            if pid in family:
                return proc
        raise LookupError(f"no worker has process {pid}")

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def cluster(redis_url: str, moto_s3: str, tmp_path_factory: pytest.TempPathFactory):
    """Two real `porter worker` processes (queue cpu, one task each) on Redis and moto's S3."""
    base = tmp_path_factory.mktemp("cluster")
    (base / "logs").mkdir()
    (base / "cache").mkdir()
    env = worker_env(redis_url, moto_s3, base / "cache")
    env["PORTER_CONFIG"] = str(base / "porter.toml")
    (base / "porter.toml").write_text("")
    c = Cluster(redis_url, env, base / "logs", base / "cache")
    c.start_worker()
    c.start_worker()
    try:
        c.wait_for_workers(2)
    except TimeoutError:
        c.stop()
        pytest.fail(f"workers did not start:\n{c.log_tails(2000)}")
    yield c
    c.stop()
