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
