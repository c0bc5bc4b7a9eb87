"""The megatron-hf job kind end to end: `porter convert|plan|submit megatron-hf`, loaded back by
transformers; the queued S3 → S3 job through real workers equals the local conversion."""

from __future__ import annotations

import json

import pytest

from converters.megatron.example import Layout
from tasks.cli.main import main
from tests.test_distributed import download, upload

LEGACY_TP2 = Layout("legacy", 2, 1)


def test_cli_convert_writes_a_checkpoint_transformers_loads(megatron, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import torch

    fixture = megatron("llama")
    out = tmp_path / "hf"
    args = ["convert", "megatron-hf", str(fixture.paths[LEGACY_TP2]), str(out)]
    assert main([*args, "--max-shard-size", "64KB", "--quiet"]) == 0
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith(".porter"))
    shards = [name for name in files if name.startswith("model-")]
    assert len(shards) > 1 and all(
        name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards
    )
    assert set(files) == {*shards, "config.json", "generation_config.json",
                          "model.safetensors.index.json", "manifest.json"}  # fmt: skip
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} == set(files) - {"manifest.json"}

    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(fixture.tokens[None, :]).logits[0]
    assert torch.allclose(logits, fixture.logits.float(), atol=1e-4, rtol=0)
    assert "Hugging Face layout" in capsys.readouterr().out

    assert (
        main(["plan", "megatron-hf", str(fixture.paths[LEGACY_TP2]), "--max-shard-size", "64KB"])
        == 0
    )
    plan = capsys.readouterr().out
    assert "LlamaForCausalLM" in plan and all(name in plan for name in shards)


def test_gpt_is_refused_with_the_reason(megatron, tmp_path, capsys):
    source = megatron("gpt").paths[LEGACY_TP2]
    assert main(["convert", "megatron-hf", str(source), str(tmp_path / "hf"), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert str(source) in error and "LayerNorm" in error
    assert not (tmp_path / "hf").exists()


def test_queued_s3_job_equals_the_local_conversion(cluster, s3_env, megatron, tmp_path):
    source = megatron("llama").paths[LEGACY_TP2]
    upload(source, f"s3://{s3_env}/ckpt")
    result = cluster.porter(
        "submit", "megatron-hf", f"s3://{s3_env}/ckpt", f"s3://{s3_env}/hf",
        "--max-shard-size", "64KB", "--dtype", "bfloat16", "--wait",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = result.stdout.splitlines()[0]
    assert job.startswith("megatron-hf-")

    local = tmp_path / "local"
    args = ["convert", "megatron-hf", str(source), str(local), "--quiet"]
    assert main([*args, "--max-shard-size", "64KB", "--dtype", "bfloat16"]) == 0
    got = download(f"s3://{s3_env}/hf", tmp_path / "got")
    manifest = json.loads(got.pop("manifest.json"))
    expected = {p.name: p.read_bytes() for p in local.iterdir() if p.is_file()}
    expected.pop("manifest.json")
    expected = {k: v for k, v in expected.items() if not k.startswith(".porter")}
    assert got == expected  # byte-identical to `porter convert`
    assert manifest["job_id"] == job and {f["path"] for f in manifest["files"]} == set(got)
    status = cluster.porter("status", job)
    assert "Hugging Face layout" in status.stdout and "SUCCEEDED" in status.stdout


def write_tokenizer(directory, size: int) -> None:
    """A small word-level tokenizer of `size` ids, saved by the `tokenizers` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "notes.txt").write_text("not a tokenizer file: left behind")


def test_tokenizer_passthrough_and_vocab_trimming(megatron, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    fixture = megatron("llama")  # 102 padded vocab rows
    write_tokenizer(tmp_path / "tok", 100)
    out = tmp_path / "hf"
    args = ["convert", "megatron-hf", str(fixture.paths[LEGACY_TP2]), str(out), "--quiet"]
    assert main([*args, "--tokenizer", str(tmp_path / "tok"), "--vocab-size", "100"]) == 0
    assert not (out / "notes.txt").exists()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 100 and tokenizer.convert_tokens_to_ids("w7") == 7
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 0 and generation["eos_token_id"] == 1
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 100
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(fixture.tokens[None, :]).logits[0]
    assert logits.shape[-1] == 100  # the first 100 rows of Megatron's padded 102
    assert torch.allclose(logits, fixture.logits[:, :100].float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--vocab-size", "103"], "103"),  # more rows than the checkpoint stores
        (
            ["--tokenizer", "{tok}", "--vocab-size", "50"],
            "100 token ids, more than --vocab-size 50",
        ),
        (["--tokenizer", "{empty}"], "holds no tokenizer"),
        (["--tokenizer", "{broken}"], "does not parse as JSON"),
        (["--max-shard-size", "10KB"], "--max-shard-size"),
    ],
)
def test_bad_hf_options_are_refused_before_anything_is_written(
    megatron, tmp_path, capsys, extra, message
):
    write_tokenizer(tmp_path / "tok", 100)
    (tmp_path / "empty").mkdir()
    write_tokenizer(tmp_path / "broken", 10)
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    places = {"tok": tmp_path / "tok", "empty": tmp_path / "empty", "broken": tmp_path / "broken"}
    extra = [e.format(**places) for e in extra]
    source = megatron("llama").paths[LEGACY_TP2]
    out = tmp_path / "hf"
    assert main(["convert", "megatron-hf", str(source), str(out), "--quiet", *extra]) == 1
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error
    assert not out.exists()


def test_kill_9_of_a_worker_mid_shard_recovers(cluster, s3_env, megatron, tmp_path):
    """The recovery of ranks (heartbeats, reaper) holds for any kind's fan-out steps."""
    import signal
    import time

    from tasks.jobs.records import JobRecords
    from tests.test_distributed import wait_state
    from tests.test_recovery import pid_of, running_step

    source = megatron("llama").paths[LEGACY_TP2]
    upload(source, f"s3://{s3_env}/ckpt")
    records = JobRecords(cluster.redis_url)
    result = cluster.porter("submit", "megatron-hf", f"s3://{s3_env}/ckpt", f"s3://{s3_env}/hf")
    assert result.returncode == 0, result.stderr
    job = result.stdout.splitlines()[0]
    step, fields = running_step(records, job, prefix="shard:")
    victim = cluster.worker_of(pid_of(fields))
    cluster.stop_worker(victim, signal.SIGKILL)  # main process and pool child, no goodbye
    killed_at = time.monotonic()
    try:
        record = wait_state(records, job, ("SUCCEEDED", "FAILED"), timeout=60)
        assert record["state"] == "SUCCEEDED", record["error"]
        assert time.monotonic() - killed_at < 30  # the visibility timeout is 12 h
        assert record["steps"][step]["deliveries"] == 2
        local = tmp_path / "local"
        assert main(["convert", "megatron-hf", str(source), str(local), "--quiet"]) == 0
        got = download(f"s3://{s3_env}/hf", tmp_path / "got")
        assert got["model.safetensors"] == (local / "model.safetensors").read_bytes()
    finally:
        cluster.start_worker()
        cluster.wait_for_workers(2)
