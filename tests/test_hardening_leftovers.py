"""Issue 15's leftovers (what the first three hardening passes noted and did not do), against the
hardened stack of `tests/test_hardening_locations.py` (redis with `requirepass`, a real `porter
worker` with location allow-lists and a job secret, moto's S3):

- symlinks in a PowerInfer activation directory or a `--tokenizer` directory that resolve outside
  `PORTER_ALLOWED_SOURCES` are refused, queued and local, and the message names the link only;
- readers never quote a file's contents in their errors (DistCheckpoint's `sharded_backend`);
- a worker with no allow-list says so at start.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from converters.dtypes import FLOAT32
from converters.megatron.example import Layout
from tasks.cli.main import main
from tasks.jobs.records import JobRecords
from tests.cluster import Cluster, start_redis, wait_until
from tests.test_distributed import wait_state
from tests.test_hardening_locations import Stack, new_job, stack  # noqa: F401  (the module's own stack)
from tests.test_megatron_hf_job import LEGACY_TP2, write_tokenizer
from tests.test_powerinfer_cli import write_activations

SECRET_TEXT = "hunter2-the-secret-of-another-team"
BUDGET = ["--vram-capacity", "4000000000", "--capacity", "4096"]


def _link_out(hardened: Stack, path: Path) -> Path:
    """Move `path` outside the allowed roots and leave a symlink to it in its place."""
    target = hardened.outside / f"{path.parent.name}-{path.name}"
    shutil.move(path, target)
    path.symlink_to(target)
    return target


def _refused_for_the_link(text: str, link: Path, target: Path) -> None:
    assert "PORTER_ALLOWED_SOURCES" in text and link.name in text, text
    assert str(target) not in text  # names the link, never where it points


def test_a_linked_activation_file_out_of_the_roots_is_refused(stack):  # noqa: F811
    directory = stack.sources / "team-a" / "acts-linked"
    write_activations(directory, seed=3)
    target = _link_out(stack, directory / "activation_2.pt")
    output = stack.outputs / "idx-linked"
    result = stack.cluster.porter(
        "submit", "powerinfer-index", str(directory), str(output), *BUDGET, "--wait"
    )
    assert result.returncode != 0, result.stdout
    _refused_for_the_link(result.stderr, directory / "activation_2.pt", target)
    assert not output.exists()


def test_a_linked_activation_file_is_refused_by_porter_convert_too(stack, monkeypatch, capsys):  # noqa: F811
    directory = stack.sources / "team-a" / "acts-local"
    write_activations(directory, seed=4)
    target = _link_out(stack, directory / "activation_0.pt")
    monkeypatch.setenv("PORTER_ALLOWED_SOURCES", str(stack.sources))
    monkeypatch.setenv("PORTER_ALLOWED_OUTPUTS", str(stack.outputs))
    monkeypatch.delenv("PORTER_ALLOW_ANY_LOCATION", raising=False)
    output = stack.outputs / "idx-local"
    assert main(["convert", "powerinfer-index", str(directory), str(output), *BUDGET]) == 1
    _refused_for_the_link(capsys.readouterr().err, directory / "activation_0.pt", target)
    assert not output.exists()
    # the same directory, unlinked, converts: the refusal was the link's
    (directory / "activation_0.pt").unlink()
    shutil.move(target, directory / "activation_0.pt")
    assert main(["convert", "powerinfer-index", str(directory), str(output), *BUDGET]) == 0


def test_a_linked_tokenizer_file_out_of_the_roots_is_refused(stack, megatron):  # noqa: F811
    checkpoint = stack.sources / "team-a" / "llama"
    shutil.copytree(megatron("llama").paths[LEGACY_TP2], checkpoint)
    tok = stack.sources / "team-a" / "tok-linked"
    write_tokenizer(tok, 10)
    target = _link_out(stack, tok / "tokenizer.json")
    output = stack.outputs / "hf-linked"
    result = stack.cluster.porter(
        "submit", "megatron-hf", str(checkpoint), str(output), "--tokenizer", str(tok)
    )
    assert result.returncode == 0, result.stderr  # found at plan, where the files are read
    job = result.stdout.splitlines()[0]
    record = wait_state(JobRecords(stack.url), job, ("SUCCEEDED", "FAILED"))
    assert record["state"] == "FAILED", record
    _refused_for_the_link(json.dumps(record), tok / "tokenizer.json", target)
    assert not (output / "tokenizer.json").exists() and not (output / "manifest.json").exists()


# --- error messages never quote file contents --------------------------------------------------


def test_the_torch_dist_reader_never_quotes_its_files(megatron, tmp_path):
    from converters.errors import ConversionError
    from converters.megatron.dist import DistCheckpoint

    copy = tmp_path / "dist"
    shutil.copytree(megatron("gpt").paths[Layout("torch_dist", 2, 1)] / "iter_0000010", copy)
    metadata = (copy / "metadata.json").read_text()
    (copy / "metadata.json").write_text(json.dumps({"sharded_backend": SECRET_TEXT}))
    with pytest.raises(ConversionError) as info:
        DistCheckpoint(copy)
    assert "sharded_backend" in str(info.value) and "metadata.json" in str(info.value)
    assert SECRET_TEXT[:4] not in str(info.value)
    # a `.metadata` that is a secret's text: the unpickler's message held a byte of it
    # ("Memo value not found at index 117": 'u', the secret's second character)
    (copy / "metadata.json").write_text(metadata)
    (copy / ".metadata").write_text(SECRET_TEXT + "\n")
    with pytest.raises(ConversionError) as info:
        DistCheckpoint(copy)
    assert str(info.value).endswith("cannot unpickle the checkpoint metadata (UnpicklingError)")


@pytest.mark.parametrize(
    "field",
    ["normalization", "position_embedding_type", "hidden_size", "rope_scaling", "moe_layer_freq"],
)
def test_megatron_args_are_shown_by_type_not_by_contents(field):
    from converters.errors import ConversionError
    from converters.megatron.args import model_config_from_args
    from tests.test_hf_families import _args

    changes = {field: SECRET_TEXT, **({"num_experts": 4} if field == "moe_layer_freq" else {})}
    with pytest.raises(ConversionError) as info:
        model_config_from_args(_args(**changes), FLOAT32, Path("model_optim_rng.pt"))
    assert field in str(info.value) and "a str" in str(info.value), info.value
    assert SECRET_TEXT[:4] not in str(info.value)
    # Megatron-LM's own names are still shown: they are a fixed set, not a file's text
    if field == "position_embedding_type":
        with pytest.raises(ConversionError, match="'mrope'"):
            model_config_from_args(_args(**{field: "mrope"}), FLOAT32, Path("m.pt"))


# --- a worker with no allow-list says so ------------------------------------------------------


def test_a_worker_without_allow_lists_warns_once_at_start(stack):  # noqa: F811
    hardened = (stack.cluster.logs / "worker-0.log").read_text()
    assert "is allowed" not in hardened  # both lists set: nothing to say
    open_env = {"PORTER_ALLOWED_SOURCES": "", "PORTER_ALLOWED_OUTPUTS": ""}
    url = stack.url.rsplit("/", 1)[0] + "/1"  # a database of its own: it takes no stack jobs
    logs = stack.cluster.logs / "open"
    logs.mkdir()
    for env, says in (
        (open_env, "any location is allowed (PORTER_ALLOWED_SOURCES and PORTER_ALLOWED_OUTPUTS"),
        ({**open_env, "PORTER_ALLOW_ANY_LOCATION": "1"}, "PORTER_ALLOW_ANY_LOCATION=1"),
        ({"PORTER_ALLOWED_OUTPUTS": ""}, "any output is allowed (PORTER_ALLOWED_OUTPUTS: not set"),
    ):
        worker = Cluster(url, {**stack.cluster.env, "PORTER_REDIS_URL": url}, logs, logs)
        worker.start_worker(env=env)
        log = logs / "worker-0.log"
        try:
            wait_until(lambda log=log: " ready." in log.read_text(), 60, "the worker")
        finally:
            worker.stop()
        text = log.read_text()
        assert text.count("WARNING] porter.worker: any ") == 1, text
        assert says in text and "PORTER_ALLOWED_SOURCES and PORTER_ALLOWED_OUTPUTS (comma" in text
        log.unlink()


# --- a queued PowerInfer OUTPUT inside ACTIVATIONS ----------------------------------------------


@pytest.mark.parametrize(
    ("activations", "output"),
    [
        ("/data/acts", "/data/acts"),
        ("/data/acts/", "/data/acts/idx"),
        ("s3://team-acts/a", "s3://team-acts/a/i"),
    ],
)
def test_a_queued_index_spec_refuses_output_inside_activations(activations, output):
    from tasks.jobs.checks import InvalidSpec
    from tasks.kinds.powerinfer_index import IndexSpec

    spec = {"activations": activations, "output": output, "budgets": [{"vram_capacity": 1}]}
    with pytest.raises(InvalidSpec, match="OUTPUT lies inside ACTIVATIONS"):
        IndexSpec.from_dict(spec)
    IndexSpec.from_dict({**spec, "output": "/data/acts-idx"})  # a sibling is not inside


def test_porter_submit_refuses_an_index_inside_its_activations(stack):  # noqa: F811
    directory = stack.sources / "team-a" / "acts-inside"
    write_activations(directory, seed=5)
    (directory / "idx").mkdir()  # empty: the OUTPUT rules alone accepted it
    result = stack.cluster.porter(
        "submit", "powerinfer-index", str(directory), str(directory / "idx"), *BUDGET
    )
    assert result.returncode == 1 and "OUTPUT lies inside ACTIVATIONS" in result.stderr


# --- porter status shows a refused step ----------------------------------------------------------


def test_porter_status_shows_why_a_step_was_refused(stack):  # noqa: F811
    """A step refused by the step guard (a never-planned job, its rank step sent by a Redis
    writer) says why in `porter status`, and a spec Porter did not write does not crash it."""
    job = new_job(
        stack,
        {"source": str(stack.checkpoint), "output": str(stack.outputs / "never-planned")},
        sealed=True,
    )
    stack.send("porter.reshard", job, 0, task_id=f"{job}:reshard:0:x")
    records = JobRecords(stack.url)
    wait_until(lambda: dict(records.steps(job)).get("reshard:0", {}).get("refused"), 60, "refusal")
    result = stack.cluster.porter("status", job)
    assert result.returncode == 0, result.stderr  # its spec lacks `pp`: this used to crash
    assert "(a spec its kind cannot read)" in result.stdout
    line = next(x for x in result.stdout.splitlines() if x.strip().startswith("reshard:0"))
    assert "refused: the job is PENDING, not planned" in line, result.stdout


# --- the command line against a hung Redis -----------------------------------------------------


def test_queue_commands_give_up_on_a_hung_redis(tmp_path):
    """A Redis that accepts connections and never answers (stopped with SIGSTOP): the queue
    commands end with one line naming PORTER_REDIS_URL instead of hanging (a 5 s socket timeout,
    not retried)."""
    import os
    import signal
    import subprocess

    from tests.cluster import PORTER

    proc, url = start_redis(tmp_path)
    env = {**os.environ, "PORTER_REDIS_URL": url}
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        for args in (["jobs"], ["status", "megatron-trtllm-0123456789abcdef"]):
            # bounded here only so that a regression fails instead of hanging the suite
            result = subprocess.run(
                [PORTER, *args], env=env, capture_output=True, text=True, timeout=120
            )
            assert result.returncode != 0, result.stdout
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "PORTER_REDIS_URL" in lines[0], result.stderr
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(10)
