"""The command line loads only what a command uses: `porter --help`, `status` and `jobs` (and the
job service behind `--wait`) import neither torch, numba, numpy, Celery nor megatron-core, so
they answer in a fraction of a second. Checked in a fresh interpreter through `sys.modules` (a
correctness check of what is imported, not a timing). And `--wait` hears at once that a job
ended: the end is published by whatever writes it. And `porter` run as the program spares its
shutdown the final garbage collection; `main(argv)` called in a process that goes on does not."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tasks.jobs import service
from tasks.jobs.records import JobRecords

HEAVY = ("torch", "numba", "numpy", "celery", "megatron", "gguf", "safetensors", "transformers")
# Lighter, but none of these commands uses them either (issue 16, ≈10-30 ms each): the config
# file parsers when no PORTER_CONFIG is set (config.settings imports them to read one), and
# importlib.metadata (Porter's version, asked for by a publish only; `status` and `jobs` load it
# anyway, through the redis client, so it is checked on `--help`).
NO_CONFIG = ("yaml", "tomllib")
HELP_ONLY = ("importlib.metadata",)

# Runs `porter ARGS` in this interpreter, then prints which of FORBIDDEN it loaded.
_RUN = """
import json, sys
from tasks.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(name for name in FORBIDDEN if name in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
"""


def _porter(
    args: list[str], env: dict[str, str] | None = None, forbidden: tuple[str, ...] = ()
) -> dict:
    """`porter ARGS` in a fresh interpreter, with no PORTER_CONFIG unless `env` names one: its
    exit code and which of HEAVY + NO_CONFIG + `forbidden` it imported."""
    import os

    env = env if env is not None else {k: v for k, v in os.environ.items() if k != "PORTER_CONFIG"}
    code = f"FORBIDDEN = {HEAVY + NO_CONFIG + forbidden!r}\n{_RUN}"
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert out.stdout.strip(), out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_and_every_kind_parser_import_nothing_heavy():
    assert _porter(["--help"], forbidden=HELP_ONLY) == {"code": 0, "heavy": []}
    for kind in ("megatron-trtllm", "megatron-hf", "powerinfer-index"):
        assert _porter(["submit", kind, "--help"]) == {"code": 0, "heavy": []}


def test_only_the_program_skips_the_collection_at_exit():
    """`porter` run as the program freezes the collector's objects as it ends (its shutdown then
    skips a ≈30 ms collection over the redis client's modules); `main(argv)` in a process that
    goes on (tests, embedders) must leave the collector as it was."""
    code = (
        "import gc, sys\n"
        "from tasks.cli.main import main\n"
        "sys.argv = ['porter', '--help']\n"
        "for argv in (['--help'], None):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    print('frozen', gc.get_freeze_count(), file=sys.stderr)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    counts = [int(line.split()[1]) for line in out.stderr.splitlines() if line[:7] == "frozen "]
    assert len(counts) == 2 and counts[0] == 0 and counts[1] > 10_000, (counts, out.stderr[-2000:])


@pytest.fixture
def job_env(redis_url, monkeypatch):
    import os

    monkeypatch.setenv("PORTER_REDIS_URL", redis_url)
    monkeypatch.delenv("PORTER_CONFIG", raising=False)
    return dict(os.environ, PORTER_REDIS_URL=redis_url)


def test_a_yaml_config_file_is_still_read(redis_url, job_env, tmp_path):
    """The parsers are imported when a config file is read: a YAML file's settings apply (and
    yaml shows up in the check above, so the check sees it), a malformed one is refused naming
    the file."""
    config = tmp_path / "porter.yaml"
    config.write_text(f"porter:\n  redis_url: {redis_url}\n")
    env = {k: v for k, v in job_env.items() if k != "PORTER_REDIS_URL"}
    assert _porter(["jobs", "--limit", "1"], env | {"PORTER_CONFIG": str(config)}) == {
        "code": 0,
        "heavy": ["yaml"],
    }
    config.write_text("porter: [\n")
    out = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "jobs"], env=env | {"PORTER_CONFIG": str(config)},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert f"{config}: cannot read the Porter config file" in out.stderr, out.stderr


@pytest.mark.parametrize("kind", ["megatron-trtllm", "megatron-hf", "powerinfer-index"])
def test_status_and_jobs_import_nothing_heavy(redis_url, job_env, kind):
    records = JobRecords(redis_url, ttl=60)
    job = f"{kind}-{uuid.uuid4().hex[:16]}"
    spec = {"source": "/ckpt", "output": "/out", "tp": 2, "pp": 1}
    spec |= {"activations": "/act", "budgets": [{"vram_capacity": 1 << 30}]}
    records.create(job, kind, spec, output="/out")
    records.finish(job, "FAILED", "reshard:0: boom")
    assert _porter(["status", job], job_env) == {"code": 0, "heavy": []}
    assert _porter(["jobs", "--limit", "5"], job_env) == {"code": 0, "heavy": []}


def _wait_in_thread(records: JobRecords, job: str) -> tuple[threading.Thread, dict]:
    seen: dict = {}

    def run() -> None:
        seen["record"] = service.wait(records, job, poll=600)  # a poll would take 10 minutes

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, seen


@pytest.mark.parametrize("end", ["finish", "cancel"])
def test_wait_hears_the_end_at_once(redis_url, end):
    """`service.wait` (behind `--wait`) returns when the job ends, not at its next poll: with
    a 10-minute poll it still returns within seconds of `finish` / `force_state`."""
    records = JobRecords(redis_url, ttl=60)
    job = f"megatron-trtllm-{uuid.uuid4().hex[:16]}"
    records.create(job, "megatron-trtllm", {"source": "/c", "output": "/o", "tp": 2})
    records.start(job)
    thread, seen = _wait_in_thread(records, job)
    time.sleep(0.5)  # the waiter has read the record (RUNNING) and waits on the message
    assert thread.is_alive()
    if end == "finish":
        assert records.finish(job, "SUCCEEDED")
    else:
        records.force_state(job, "CANCELLED", "cancelled by request")
    thread.join(timeout=30)
    assert not thread.is_alive(), "wait did not hear that the job ended"
    assert seen["record"]["state"] == ("SUCCEEDED" if end == "finish" else "CANCELLED")


def test_wait_returns_for_a_job_that_already_ended(redis_url):
    records = JobRecords(redis_url, ttl=60)
    job = f"megatron-trtllm-{uuid.uuid4().hex[:16]}"
    records.create(job, "megatron-trtllm", {"source": "/c", "output": "/o", "tp": 2})
    records.finish(job, "FAILED", "plan: boom")
    thread, seen = _wait_in_thread(records, job)
    thread.join(timeout=30)
    assert seen["record"]["state"] == "FAILED"


def test_listing_an_s3_source_imports_no_torch(s3_env, tmp_path):
    """`porter submit` of an s3:// source identifies it (one listing) without the readers: the
    listing's `Location` lives beside the sparse objects, not in the torch-importing mirror."""
    import os

    import boto3

    client = boto3.session.Session().client("s3")
    client.put_object(Bucket=s3_env, Key="ckpt/latest_checkpointed_iteration.txt", Body=b"10")
    client.put_object(
        Bucket=s3_env, Key="ckpt/iter_0000010/mp_rank_00/model_optim_rng.pt", Body=b"x"
    )
    code = (
        "import json, sys\n"
        "from tasks.storage.sources import source_identity\n"
        f"files = source_identity('s3://{s3_env}/ckpt')\n"
        "heavy = sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'numpy', 'megatron'})\n"
        "print(json.dumps({'files': [f[0] for f in files], 'heavy': heavy}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env=dict(os.environ), check=False,
    )  # fmt: skip
    assert out.stdout.strip(), out.stderr[-2000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer == {"files": ["iter_0000010/mp_rank_00/model_optim_rng.pt"], "heavy": []}


@pytest.mark.parametrize("kind", ["megatron-trtllm", "megatron-hf"])
def test_a_conversion_imports_no_torch(megatron, tmp_path, kind):
    """`porter convert` reads (legacy .pt and torch_dist) and writes with numpy only: the 1.3 s
    torch import was more than the whole copy of a 1 GiB checkpoint (issue 16)."""
    from tests.conftest import LAYOUTS

    for layout in (LAYOUTS[1], LAYOUTS[4]):  # legacy TP2, torch_dist TP2
        assert layout.tp == 2
        source = megatron("llama").paths[layout]
        out = tmp_path / f"{kind}-{layout.dirname}"
        args = ["convert", kind, str(source), str(out), "--quiet"]
        args += ["--tp", "4"] if kind == "megatron-trtllm" else []
        forbidden = ("torch", "megatron", "celery", "transformers", "safetensors", "numba")
        got = _porter(args, forbidden=forbidden)
        heavy = [name for name in got["heavy"] if name != "numpy"]
        assert (got["code"], heavy) == (0, []), layout
        assert (out / "manifest.json").exists()
