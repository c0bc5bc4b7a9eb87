"""`porter verify` as a command and as a job step: exit codes, the table and --json; `--verify`
on a local conversion and on a queued S3 job through real workers (the verdict in manifest.json
and the job record); a converter bug fails the job and publishes nothing; `verify = true` in an
export profile."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from converters.megatron.example import Layout
from converters.trtllm import reshard
from tasks.cli.main import main
from tasks.executors.local import run_conversion
from tasks.kinds.megatron_trtllm import ConvertSpec
from tasks.kinds.verify_step import VerificationFailed
from tasks.triggers.profiles import parse_profiles
from tests.test_distributed import download, upload
from tests.test_verify import drop_rope_scaling, edit_config

TP2 = Layout("legacy", 2, 1)


@pytest.fixture(scope="module")
def trtllm_export(megatron, tmp_path_factory):
    source = megatron("llama").paths[TP2]
    out = tmp_path_factory.mktemp("verify-cli") / "export"
    assert main(["convert", "megatron-trtllm", str(source), str(out), "--tp", "2", "--quiet"]) == 0
    return source, out


def test_cli_clean_export_table_and_json(trtllm_export, capsys):
    source, out = trtllm_export
    assert main(["verify", str(source), str(out), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["stage", "max", "abs", "relative", "result"]
    assert [line.split()[0] for line in lines[1:7]] == ["embedding", *["layer"] * 4, "final"]
    assert all(" ok" in line for line in lines[1:7]) and lines[-1].startswith("verified: ")

    assert main(["verify", str(source), str(out), "--json", "--tokens", "5", "--seed", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["failure"] is None and len(report["tokens"]) == 5
    assert [s["layer"] for s in report["stages"]] == [None, 0, 1, 2, 3, None]
    assert {p["part"] for p in report["stages"][1]["parts"]} == {"attention", "MLP"}


def test_cli_failure_exits_1_naming_layer_and_part(trtllm_export, tmp_path, capsys):
    source, out = trtllm_export
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    tensors = load_file(bad / "rank0.safetensors")
    tensors["transformer.layers.2.mlp.proj.weight"] *= 0.5
    save_file(tensors, bad / "rank0.safetensors")
    assert main(["verify", str(source), str(bad), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "DIFFERS (MLP)" in captured.out
    assert captured.err.startswith("porter: verification failed: layer 2 (transformer.layers.2")
    assert main(["verify", str(source), str(bad), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["failure"].startswith("layer 2 ")


def test_cli_bad_input(trtllm_export, tmp_path, capsys):
    source, out = trtllm_export
    assert main(["verify", str(source), str(out), "--tolerance", "tight"]) == 1
    assert "--tolerance 'tight'" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    (unfinished / "manifest.json").unlink()
    assert main(["verify", str(source), str(unfinished)]) == 1
    err = capsys.readouterr().err
    assert str(unfinished) in err and "unfinished export: no manifest.json" in err


def test_cli_cross_check_with_transformers(megatron, tmp_path, capsys):
    pytest.importorskip("transformers")
    source = megatron("llama31").paths[TP2]
    out = tmp_path / "hf"
    assert main(["convert", "megatron-hf", str(source), str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["verify", str(source), str(out), "--cross-check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    checked = report["cross_check"]
    assert checked["ok"] and "through transformers" in checked["export"]
    assert len(checked["stages"]) == 6 and 0 < max(s["relative"] for s in checked["stages"]) < 1e-5

    edit_config(out, drop_rope_scaling)
    assert main(["verify", str(source), str(out), "--cross-check", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    for found in (report, report["cross_check"]):  # Porter's reading and transformers' agree
        assert found["failure"].startswith("layer 0 (model.layers.0): attention differs")


def test_convert_with_verify_records_the_verdict(megatron, tmp_path, capsys):
    source = megatron("qwen3").paths[TP2]
    out = tmp_path / "hf"
    assert main(["convert", "megatron-hf", str(source), str(out), "--verify", "--quiet"]) == 0
    assert "verified against the source: 4 layers, 16 tokens" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    verdict = manifest["source"]["verification"]
    assert verdict["ok"] and verdict["failure"] is None and verdict["tokens"] == 16
    assert manifest["spec"]["verify"] is True


def test_a_converter_bug_fails_the_job_and_publishes_nothing(megatron, tmp_path, monkeypatch):
    """A seeded re-shard bug (gate and up swapped for every layer) that writes a well-formed,
    loadable export: only the verification can tell."""
    real = reshard.gated_halves
    monkeypatch.setattr(reshard, "gated_halves", lambda t: tuple(reversed(real(t))))
    out = tmp_path / "out"
    spec = ConvertSpec(str(megatron("llama").paths[TP2]), str(out), tp=2, verify=True)
    with pytest.raises(VerificationFailed, match=r"layer 0 \(transformer.layers.0 in rank0"):
        run_conversion(spec, workers=1)
    assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith("."))
    unverified = ConvertSpec(str(megatron("llama").paths[TP2]), str(tmp_path / "u"), tp=2)
    run_conversion(unverified, workers=1)  # without --verify the same bug is published
    assert (tmp_path / "u" / "manifest.json").exists()


def test_verify_in_an_export_profile():
    profiles = parse_profiles(
        {
            "profiles": {
                "m": {
                    "exports": {
                        "hf": {
                            "kind": "megatron-hf",
                            "output": "s3://exports/{iteration}",
                            "verify": True,
                        },
                        "tp2": {"kind": "megatron-trtllm", "output": "s3://exports/t", "tp": 2},
                    }
                }
            }
        }
    )
    (_, hf), (_, tp2) = profiles["m"].expand("s3://ckpt/iter_0000001", "1")
    assert hf.verify is True and tp2.verify is False
    assert "verify" not in tp2.to_dict()  # job ids of specs without it stay what they were


def test_queued_s3_job_verifies_before_publishing(cluster, s3_env, megatron, tmp_path):
    source = megatron("llama31").paths[TP2]
    upload(source, f"s3://{s3_env}/v-ckpt")
    result = cluster.porter(
        "submit", "megatron-hf", f"s3://{s3_env}/v-ckpt", f"s3://{s3_env}/v-hf",
        "--verify", "--wait", timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = result.stdout.splitlines()[0]
    got = download(f"s3://{s3_env}/v-hf", tmp_path / "got")
    manifest = json.loads(got["manifest.json"])
    assert manifest["job_id"] == job and manifest["source"]["verification"]["ok"] is True
    record = json.loads(cluster.porter("status", job, "--json", check=True).stdout)
    assert record["steps"]["verify:0"]["state"] == "SUCCEEDED"  # the job record has the step
    assert record["inspected"]["verification"]["ok"] is True
