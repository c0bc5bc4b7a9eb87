"""Issue 15, item 11: the smaller things a user trips on, through the real CLI, workers and Redis.

`--every 1` accepted, `porter jobs` with blank progress and a ragged table, "0.00 GB/s" for a tiny
conversion, "OUTPUT is not empty" naming the entries it found, and a routine refusal logged by the
workers at ERROR with a traceback.
"""

from __future__ import annotations

import os
import re
import time

import redis

from converters.megatron.example import Layout
from tasks.cli.main import main
from tasks.jobs.records import JobRecords
from tests.test_distributed import wait_state

TINY = Layout("legacy", 1, 1)


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*args])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def test_every_below_the_minimum_is_refused_and_stores_nothing(capsys, monkeypatch, redis_url):
    monkeypatch.setenv("PORTER_REDIS_URL", redis_url)
    monkeypatch.delenv("PORTER_SCHEDULE_MIN_INTERVAL", raising=False)
    monkeypatch.delenv("PORTER_CONFIG", raising=False)
    name = f"h-{os.urandom(4).hex()}"
    add = ("schedule", "add", name, "--profile", "nope", "--source", "/srv/train")
    for every in ("1", "59s", "0.5m"):
        code, _, err = run(capsys, *add, "--every", every)
        assert code == 1 and "shorter than 60 s" in err and "PORTER_SCHEDULE_MIN_INTERVAL" in err
    # a minute is accepted (this one then fails on its unknown profile, after the interval check)
    code, _, err = run(capsys, *add, "--every", "1m")
    assert code == 1 and "no export profile 'nope'" in err, err
    assert not redis.Redis.from_url(redis_url).keys(f"*{name}*")


def test_jobs_table_shows_progress_and_fits_every_id(capsys, monkeypatch, redis_url):
    """Progress was blank without --watch, and a 33-character id (powerinfer-index-…) pushed its
    row's columns one place right of the header's."""
    monkeypatch.setenv("PORTER_REDIS_URL", redis_url)
    records = JobRecords(redis_url)
    spec = {"output": "s3://bucket-a/out", "source": "s3://bucket-a/src", "tp": 2}
    made = {}
    for kind, state, inspected, steps, shown in [
        ("megatron-trtllm", "PENDING", None, {}, "-"),
        ("megatron-trtllm", "RUNNING", {"ranks": [{"bytes_written": 100}] * 2},
         {"reshard:0": {"state": "RUNNING", "done": 50, "total": 100}}, "25%"),
        ("powerinfer-index", "RUNNING", {"layers": [0, 1]},
         {"stats:0": {"state": "SUCCEEDED"}, "stats:1": {"state": "SUCCEEDED"}}, "50%"),
        ("megatron-trtllm", "RUNNING", {"ranks": [{"rank": 0}]}, {}, "?"),  # an odd plan
    ]:  # fmt: skip
        job = f"{kind}-{os.urandom(8).hex()}"
        records.create(job, kind, spec, output=spec["output"])
        records.update(job, inspected=inspected)
        records.force_state(job, state)
        for step, fields in steps.items():
            records.step(job, step, **fields)
        made[job] = (state, shown)
        time.sleep(0.01)  # distinct creation times: the table is newest first
    code, out, _ = run(capsys, "jobs", "--limit", "4")
    assert code == 0
    header, *rows = out.splitlines()
    assert len(rows) == 4 and {row.split()[0] for row in rows} == set(made)
    state_at, progress_end = header.index("state"), header.index("progress") + len("progress")
    for row in rows:
        job = row.split()[0]
        state, shown = made[job]
        assert row[state_at:].startswith(state), (header, row)  # the columns line up
        assert row[:progress_end].endswith(shown), (header, row)  # right-aligned progress


def test_a_tiny_conversion_prints_a_real_rate_or_none(capsys, megatron, tmp_path):
    source = megatron("gpt").paths[TINY]
    code, out, err = run(capsys, "convert", "megatron-trtllm", str(source), str(tmp_path / "o"),
                         "--tp", "1", "--quiet")  # fmt: skip
    assert code == 0, err
    [line] = [line for line in out.splitlines() if " wrote " in line]
    assert "0.00 GB/s" not in line, line
    rate = re.search(r"\(([\d.]+) (B|KiB|MiB|GiB|TiB)/s\)$", line)
    assert rate is None or float(rate.group(1)) > 0, line
    assert rate is not None or line.endswith("B"), line  # no rate at all: nothing after the bytes


def test_output_not_empty_says_how_many_entries_not_which(capsys, megatron, tmp_path):
    """The message lands in the job record, which any reader of GET /v1/jobs sees."""
    output = tmp_path / "out"
    output.mkdir()
    for name in ("salaries-2026.xlsx", "id_rsa"):
        (output / name).write_text("private")
    source = megatron("gpt").paths[TINY]
    code, _, err = run(capsys, "convert", "megatron-trtllm", str(source), str(output), "--tp", "1")
    assert code == 1 and "OUTPUT is not empty" in err and "2 " in err, err
    assert "salaries" not in err and "id_rsa" not in err, err


def test_a_routine_refusal_is_one_warning_line_in_the_worker_log(cluster, megatron, tmp_path):
    """A job refused for its input was logged at ERROR with a traceback (Celery's "raised
    unexpected"): alerts on worker errors fired for a user's mistake."""
    output = tmp_path / "taken"
    output.mkdir()
    (output / "notes.txt").write_text("someone else's")
    source = megatron("gpt").paths[TINY]
    result = cluster.porter("submit", "megatron-trtllm", str(source), str(output), "--tp", "1")
    assert result.returncode == 0, result.stderr
    job = result.stdout.splitlines()[0]
    record = wait_state(JobRecords(cluster.redis_url), job, ("FAILED", "SUCCEEDED"))
    assert record["state"] == "FAILED" and "OUTPUT is not empty" in record["error"], record

    def lines() -> list[str]:
        text = "\n".join(p.read_text(errors="replace") for p in cluster.logs.iterdir())
        return [line for line in text.splitlines() if job in line]

    for _ in range(50):  # the worker writes its log lines after recording the failure
        if any("failed in" in line for line in lines()):
            break
        time.sleep(0.1)
    mine = lines()
    failed = [line for line in mine if "failed in" in line]
    assert len(failed) == 1 and "WARNING" in failed[0], mine
    assert not [line for line in mine if "ERROR" in line or "raised unexpected" in line], mine
    every = "\n".join(p.read_text(errors="replace") for p in cluster.logs.iterdir()).splitlines()
    after_mine = [i for i, line in enumerate(every) if job in line]
    assert not [
        i for i in after_mine if every[i + 1 : i + 2] == ["Traceback (most recent call last):"]
    ]
