"""Issue 15, "wrong or lost data": each test reproduces what a hostile-input probe of the running
stack found, against real Redis, real workers and moto's S3 where the path needs them.

1. an `iteration` selects that iteration's directory (hooks, POST /v1/jobs, batch entries);
2. `porter convert powerinfer-index` keeps OUTPUT's rules;
3. two jobs into one OUTPUT: the later one is refused while the first has not ended, and a
   commit never happens over files the manifest does not list;
4. steps sent straight to the broker write nothing into a committed OUTPUT, nor for a job that
   was not planned or is not RUNNING.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from celery import Celery

from converters.errors import ConversionError
from converters.megatron.example import Layout
from tasks.cli.main import main
from tasks.jobs.batch import read_batch
from tasks.jobs.checks import InvalidSpec
from tasks.jobs.ids import output_tag
from tasks.jobs.outputs import prepare_output, publish_step, put_bytes
from tasks.jobs.records import JobRecords
from tasks.kinds.megatron_trtllm import ConvertSpec
from tasks.storage.store import open_store
from tests.cluster import wait_until
from tests.test_distributed import upload, wait_state
from tests.test_powerinfer_cli import write_activations
from tests.test_triggers import TOKEN, job_count, receiver, request, service, signed, wait_jobs

__all__ = ["receiver", "service"]  # fixtures of tests/test_triggers.py used here

TP1 = Layout("legacy", 1, 1)
OTHER_JOB = "megatron-trtllm-" + "ab" * 8  # a job id no submission made


def _root_with_two_iterations(root: Path, megatron) -> Path:
    """The TP=1 fixture (tracker: 10) with its iteration copied as iteration 3000 too."""
    shutil.copytree(megatron("gpt").paths[TP1], root)
    shutil.copytree(root / "iter_0000010", root / "iter_0003000")
    return root


# ---- 1. an iteration selects its directory --------------------------------------------------


def test_hook_and_post_jobs_convert_the_iteration_they_name(
    service, cluster, s3_env, megatron, tmp_path
):
    """Before: a root plus "iteration": 3000 converted iteration 10 (what the tracker names) and
    published and announced it as 3000; POST /v1/jobs refused `iteration` as unknown."""
    root = _root_with_two_iterations(tmp_path / "run", megatron)
    upload(root, f"s3://{s3_env}/run")
    url = f"{service}/v1/hooks/training-complete"
    body = json.dumps({"profile": "gpt-small", "checkpoint": f"s3://{s3_env}/run/",
                       "iteration": 3000}).encode()  # fmt: skip
    status, answer = request(url, body, signed(body))
    assert status == 202, answer
    assert answer["checkpoint"] == f"s3://{s3_env}/run/iter_0003000"
    assert answer["iteration"] == "3000"
    records = wait_jobs(service, [j["job"] for j in answer["jobs"]])
    assert [r["state"] for r in records] == ["SUCCEEDED", "SUCCEEDED"], records
    for record in records:
        assert record["spec"]["source"] == f"s3://{s3_env}/run/iter_0003000"
        assert record["iteration"] == "3000"
        manifest = open_store(f"s3://{s3_env}/exports/gpt-small/3000/{record['export']}")
        assert manifest.get_json("manifest.json")["spec"]["source"].endswith("/iter_0003000")

    count = job_count(cluster)
    refused = {
        "no such iteration": ({"checkpoint": f"s3://{s3_env}/run", "iteration": 4000},
                              "no iteration 4000"),
        "another iteration's directory": (
            {"checkpoint": f"s3://{s3_env}/run/iter_0000010", "iteration": "3000"},
            "is iteration 10, but iteration 3000 was given"),
        "not an iteration": ({"checkpoint": f"s3://{s3_env}/run", "iteration": "latest"},
                             "Megatron iteration number"),
    }  # fmt: skip
    for case, (fields, message) in refused.items():
        bad = json.dumps({"profile": "gpt-small", **fields}).encode()
        status, answer = request(url, bad, signed(bad))
        assert status == 422 and message in answer["detail"], (case, answer)
    assert job_count(cluster) == count

    auth = {"Authorization": f"Bearer {TOKEN}"}
    spec = {"kind": "megatron-trtllm", "source": f"s3://{s3_env}/run", "iteration": 3000,
            "output": f"s3://{s3_env}/api-3000", "tp": 1}  # fmt: skip
    status, created = request(f"{service}/v1/jobs", json.dumps(spec).encode(), auth)
    assert status == 201, created
    (record,) = wait_jobs(service, [created["id"]])
    assert record["state"] == "SUCCEEDED", record
    assert record["spec"]["source"] == f"s3://{s3_env}/run/iter_0003000"
    assert record["iteration"] == "3000" and record["trigger"] == "api"
    wrong = {**spec, "source": f"s3://{s3_env}/run/iter_0000010"}
    status, answer = request(f"{service}/v1/jobs", json.dumps(wrong).encode(), auth)
    assert status == 422 and "is iteration 10" in answer["detail"], answer


def test_batch_entries_take_an_iteration(megatron, tmp_path):
    root = _root_with_two_iterations(tmp_path / "run", megatron)
    batch = tmp_path / "batch.yaml"
    batch.write_text(
        f"- {{kind: megatron-trtllm, source: {root}, iteration: 3000, output: /x/a, tp: 1}}\n"
        f"- {{kind: megatron-trtllm, source: {root}/iter_0000010, iteration: '10', "
        "output: /x/b, tp: 1}\n"
        f"- {{kind: megatron-trtllm, source: {root}, output: /x/c, tp: 1}}\n"
    )
    (a, a_labels), (b, b_labels), (c, c_labels) = read_batch(batch)
    assert (a.source, a_labels) == (f"{root}/iter_0003000", {"iteration": "3000"})
    assert (b.source, b_labels) == (f"{root}/iter_0000010", {"iteration": "10"})
    assert (c.source, c_labels) == (str(root), {})
    batch.write_text(
        f"- {{kind: megatron-trtllm, source: {root}, iteration: 20, output: /x/a, tp: 1}}\n"
        f"- {{kind: megatron-trtllm, source: {root}/iter_0000010, iteration: 3000, "
        "output: /x/b, tp: 1}\n"
        f"- {{kind: powerinfer-index, activations: {root}, iteration: 3000, output: /x/c, "
        "budgets: [{vram_capacity: 1}]}\n"
    )
    with pytest.raises(InvalidSpec) as info:
        read_batch(batch)
    text = str(info.value)
    assert "3 invalid" in text and "no iteration 20" in text and "is iteration 10" in text
    assert "takes no iteration" in text


# ---- 2. porter convert powerinfer-index keeps OUTPUT's rules ---------------------------------


def _index(activations: Path, output: Path, *budget: str) -> int:
    budget = budget or ("--vram-capacity", "1", "--capacity", "2048")
    return main(["convert", "powerinfer-index", str(activations), str(output), *budget])


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_powerinfer_convert_never_overwrites_what_is_not_its_own(tmp_path, capsys):
    """Before: an unrelated file, the job's own activation file and another conversion's
    manifest.json at OUTPUT were all overwritten."""
    activations = tmp_path / "activation"
    write_activations(activations, seed=3)
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("keep me")
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"job_id": "megatron-trtllm-0123456789abcdef"}')
    before = _snapshot(tmp_path)
    cases = {
        unrelated: "was not written by this job",
        activations / "activation_0.pt": "inside ACTIVATIONS",
        activations: "inside ACTIVATIONS",
        other / "manifest.json": "was not written by this job",
    }
    for output, message in cases.items():
        capsys.readouterr()
        assert _index(activations, output) == 1, output
        assert message in capsys.readouterr().err, output
    several = ("--vram-capacity", "1", "--capacity", "2048", "--vram-capacity", "2",
               "--capacity", "4096")  # fmt: skip
    assert _index(activations, other, *several) == 1
    assert "another conversion (manifest.json)" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before  # nothing was touched

    # this very job run again: nothing is written; another job into the same file: refused
    index = tmp_path / "out" / "model.gpuidx"
    assert _index(activations, index) == 0
    done = _snapshot(tmp_path / "out")
    assert set(done) == {"model.gpuidx", "model.gpuidx.porter.json"}
    assert _index(activations, index) == 0
    assert _snapshot(tmp_path / "out") == done
    capsys.readouterr()
    assert _index(activations, index, "--vram-capacity", "1", "--capacity", "4096") == 1
    assert "was not written by this job" in capsys.readouterr().err
    assert _snapshot(tmp_path / "out") == done

    # several budgets: a directory; the same job again writes nothing, another job is refused
    indices = tmp_path / "indices"
    assert _index(activations, indices, *several) == 0
    done = _snapshot(indices)
    assert json.loads((indices / "manifest.json").read_text())["job_id"].startswith("powerinfer")
    assert _index(activations, indices, *several) == 0
    assert _snapshot(indices) == done
    capsys.readouterr()
    another = (*several[:5], "3", *several[6:])  # budgets 1 and 3: gpu_index.1 is not its own
    assert _index(activations, indices, *another) == 1
    assert "another conversion" in capsys.readouterr().err
    (indices / "manifest.json").unlink()  # a killed run of another job's files: still refused
    assert _index(activations, indices, *another) == 1
    assert "4 entries this job did not write" in capsys.readouterr().err
    assert set(_snapshot(indices)) == set(done) - {"manifest.json"}


# ---- 3. two jobs into one OUTPUT --------------------------------------------------------------


def _client(cluster) -> Celery:
    client = Celery(broker=cluster.redis_url, backend=cluster.redis_url)
    client.conf.task_serializer = "json"
    return client


def _submit(cluster, source: Path | str, output: Path | str, *extra: str) -> str:
    result = cluster.porter("submit", "megatron-trtllm", str(source), str(output), *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[0]


def test_output_written_by_a_running_job_is_refused_naming_it(cluster, megatron, tmp_path):
    """Before: the later job's plan deleted the running job's rank file as a killed run's
    leftover, and committed OUTPUT with a foreign file its manifest did not list."""
    records = JobRecords(cluster.redis_url)
    source = megatron("gpt").paths[TP1]
    output = tmp_path / "out"
    spec = ConvertSpec(str(source), str(output), tp=2)
    records.create(OTHER_JOB, "megatron-trtllm", spec.to_dict(), output=str(output))
    records.start(OTHER_JOB)  # RUNNING, and has written one of its ranks
    held = open_store(output)
    put_bytes(
        held, "rank1.safetensors", b"rank 1 of the running job", output_tag(OTHER_JOB, "0" * 16)
    )

    first = _submit(cluster, source, output, "--tp", "1")
    record = wait_state(records, first, ("FAILED", "SUCCEEDED"))
    assert record["state"] == "FAILED", record
    assert OTHER_JOB in record["error"] and "RUNNING" in record["error"], record["error"]
    assert held.list() == ["rank1.safetensors"]
    assert held.stat("rank1.safetensors").tag == output_tag(OTHER_JOB, "0" * 16)

    # before it wrote anything: its plan holds OUTPUT; a later submit is refused at once, and a
    # job that got past that check (queued at the same moment) is refused by its plan
    empty = tmp_path / "empty"
    holder = OTHER_JOB.replace("ab", "cd")
    records.create(holder, "megatron-trtllm", spec.to_dict(), output=str(empty))
    records.start(holder)
    assert records.claim_output(holder, str(empty)) is None
    count = len(records.job_ids(10_000))
    refused = cluster.porter("submit", "megatron-trtllm", str(source), str(empty), "--tp", "1")
    assert refused.returncode == 1 and f"being written by job {holder}" in refused.stderr
    assert len(records.job_ids(10_000)) == count
    second = "megatron-trtllm-" + "34" * 8
    records.create(second, "megatron-trtllm", {**spec.to_dict(), "output": str(empty), "tp": 1},
                   output=str(empty))  # fmt: skip
    _client(cluster).send_task(
        "porter.plan", args=[second], task_id=f"{second}:plan:1", queue="cpu"
    )
    record = wait_state(records, second, ("FAILED", "SUCCEEDED"))
    assert record["state"] == "FAILED" and holder in record["error"], record
    assert not empty.exists() or not list(empty.iterdir())

    # once the holders ended, OUTPUT is free: the leftover is removed, the jobs convert
    for ended in (OTHER_JOB, holder):
        records.finish(ended, "FAILED", "killed")
    for job, out in ((first, output), (second, empty)):
        retried = cluster.porter("retry", job)
        assert retried.returncode == 0, retried.stderr
        assert wait_state(records, job, ("FAILED", "SUCCEEDED"))["state"] == "SUCCEEDED"
        assert json.loads((out / "manifest.json").read_text())["job_id"] == job
    assert "rank1.safetensors" not in held.list()


def test_publish_never_commits_over_files_the_manifest_does_not_list(megatron, tmp_path):
    output = tmp_path / "out"
    spec = ConvertSpec(str(megatron("gpt").paths[TP1]), str(output), tp=1)
    job = "megatron-trtllm-" + "12" * 8
    tag = output_tag(job, "0" * 16)
    assert prepare_output(spec, job) is None
    store = open_store(output)
    files = [put_bytes(store, "rank0.safetensors", b"weights", tag)]
    put_bytes(store, "_work/intermediate", b"own, removed after publishing", tag)
    strays = {
        "untagged": lambda: (output / "stray.bin").write_bytes(b"?"),
        "another job's": lambda: put_bytes(
            store, "rank1.safetensors", b"other", output_tag(OTHER_JOB, "0" * 16)
        ),
    }
    for case, plant in strays.items():
        plant()
        with pytest.raises(ConversionError, match=r"1 file\(s\) this job did not write"):
            publish_step(spec, job, tag, {}, files)
        assert not (output / "manifest.json").exists(), case
        for key in set(store.list()) - {"rank0.safetensors", "_work/intermediate"}:
            store.delete(key)
    manifest = publish_step(spec, job, tag, {}, files)
    assert [f["path"] for f in manifest["files"]] == ["rank0.safetensors"]


# ---- 4. steps sent straight to the broker ------------------------------------------------------


def _forged(records: JobRecords, model: dict, job: str, output: str, *, start: bool) -> None:
    """A record for `job` made from `model`'s (planned, so a rank step finds what it needs)."""
    spec = {**model["spec"], "output": output}
    records.create(job, model["kind"], spec, output=output)
    inspected = {**model["inspected"], "job_id": job,
                 "tag": output_tag(job, model["inspected"]["source_digest"])}  # fmt: skip
    records.update(job, inspected=inspected)
    if start:
        records.start(job)


def _step_outcome(records: JobRecords, job: str, step: str) -> dict:
    def ended() -> dict | None:
        fields = dict(records.steps(job)).get(step) or {}
        return (
            fields
            if fields.get("refused") or fields.get("state") in ("SUCCEEDED", "FAILED")
            else None
        )

    return wait_until(ended, 60, f"{job} {step} to run or be refused")


def test_rank_steps_sent_to_the_broker_write_nothing_they_should_not(cluster, megatron, tmp_path):
    """Before: a rank step of another job rewrote a file of a published OUTPUT (manifest
    unchanged), and one of a job that was never planned/started wrote into its OUTPUT."""
    records = JobRecords(cluster.redis_url)
    published = tmp_path / "published"
    job = _submit(cluster, megatron("gpt").paths[TP1], published, "--tp", "1")
    model = wait_state(records, job, ("SUCCEEDED", "FAILED"))
    assert model["state"] == "SUCCEEDED", model
    store = open_store(published)
    before = {key: (store.stat(key), (published / key).stat().st_mtime_ns) for key in store.list()}
    client = _client(cluster)

    unplanned = OTHER_JOB.replace("ab", "0f")  # PENDING: its plan never ran
    empty = tmp_path / "empty"
    _forged(records, model, unplanned, str(empty), start=False)
    client.send_task("porter.reshard", args=[unplanned, 0], task_id=f"{unplanned}:x", queue="cpu")
    outcome = _step_outcome(records, unplanned, "reshard:0")
    assert "refused: the job is PENDING" in outcome.get("refused", ""), outcome
    assert not empty.exists()
    assert records.state(unplanned) == "PENDING"

    intruder = OTHER_JOB.replace("ab", "ef")  # RUNNING and planned, but OUTPUT is committed
    _forged(records, model, intruder, str(published), start=True)
    client.send_task("porter.reshard", args=[intruder, 0], task_id=f"{intruder}:x", queue="cpu")
    outcome = _step_outcome(records, intruder, "reshard:0")
    assert outcome.get("state") == "FAILED" and "another conversion" in outcome["error"], outcome
    after = {key: (store.stat(key), (published / key).stat().st_mtime_ns) for key in store.list()}
    assert after == before


def test_an_iteration_outside_the_allowed_sources_is_refused_before_it_is_looked_at(
    megatron, tmp_path, monkeypatch
):
    """Under allow-lists, whether `<root>/iter_N` exists is never probed outside them."""
    root = _root_with_two_iterations(tmp_path / "run", megatron)
    monkeypatch.setenv("PORTER_ALLOWED_SOURCES", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("PORTER_ALLOWED_OUTPUTS", "/x")
    monkeypatch.delenv("PORTER_ALLOW_ANY_LOCATION", raising=False)
    batch = tmp_path / "batch.yaml"
    for iteration in (3000, 4000):  # one exists, one does not: the same refusal
        batch.write_text(f"- {{source: {root}, iteration: {iteration}, output: /x/a, tp: 1}}\n")
        with pytest.raises(ConversionError, match="outside PORTER_ALLOWED_SOURCES"):
            read_batch(batch)
