"""`porter example` and `porter plan`, through the CLI entry point."""

from __future__ import annotations

import json
import os
import struct
import time

from tasks.cli.main import main
from tests.conftest import LAYOUTS


def test_example_then_convert(capsys, tmp_path):
    source, output = tmp_path / "gpt", tmp_path / "trt"
    assert (
        main(
            [
                "example",
                "megatron",
                str(source),
                "--family",
                "gpt",
                "--tp",
                "2",
                "--format",
                "torch_dist",
            ]
        )
        == 0
    )
    assert (source / "iter_0000010" / "metadata.json").exists()
    assert main(["example", "megatron", str(source)]) == 0
    assert "left as is" in capsys.readouterr().out
    assert (
        main(["convert", "megatron-trtllm", str(source), str(output), "--tp", "2", "--quiet"]) == 0
    )
    config = json.loads((output / "config.json").read_text())
    assert config["architecture"] == "GPTForCausalLM" and config["mapping"]["tp_size"] == 2


def test_plan_predicts_bytes_written(capsys, megatron, tmp_path):
    source = megatron("llama").paths[LAYOUTS[3]]  # legacy TP=2 PP=2
    assert main(["plan", "megatron-trtllm", str(source), "--tp", "4", "--dtype", "bfloat16"]) == 0
    plan = capsys.readouterr().out
    assert "legacy checkpoint, training TP=2 PP=2, family llama" in plan
    output = tmp_path / "out"
    assert (
        main(
            [
                "convert",
                "megatron-trtllm",
                str(source),
                str(output),
                "--tp",
                "4",
                "--dtype",
                "bfloat16",
                "--quiet",
            ]
        )
        == 0
    )
    rows = [line.split() for line in plan.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in rows] == [0, 1, 2, 3]
    for row in rows:
        data = (output / f"rank{row[0]}.safetensors").read_bytes()
        header = struct.unpack("<Q", data[:8])[0]
        written = f"{(len(data) - 8 - header) / 1024:.2f}"
        assert row[3] == written, (row, written)  # "writes" column, KiB


def test_unreachable_redis_is_one_line_naming_it_without_the_password(capsys, monkeypatch):
    from tests.cluster import free_port

    monkeypatch.setenv("PORTER_REDIS_URL", f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    assert main(["status", f"megatron-trtllm-{'0' * 16}"]) == 1  # a job id: Redis is asked
    # A person hears within seconds (workers retry for about half a minute; this took 35 s).
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("porter: error: Redis at redis://***@")
    assert "hunter2" not in err and "PORTER_REDIS_URL" in err


def test_relative_paths_with_dotdot_are_resolved_not_refused(megatron, tmp_path, monkeypatch):
    """`porter convert ../ckpt out` from a sibling directory: resolved first, then checked."""
    from converters.megatron.example import Layout

    source = megatron("llama").paths[Layout("legacy", 2, 1)]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    relative = os.path.relpath(source, work)
    assert relative.startswith("..")
    args = ["convert", "megatron-trtllm", relative, "../out", "--tp", "2", "--quiet"]
    assert main(args) == 0
    assert (tmp_path / "out" / "manifest.json").is_file()
