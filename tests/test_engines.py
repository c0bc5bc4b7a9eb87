"""The engine-build step across its process boundary, with a stand-in for the builder command.

No GPU or TensorRT-LLM exists here: `tests/fake_trtllm_build.py` takes the builder's place and
checks what it is given. The store side is real (a local directory, and S3 over HTTP via moto).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from converters.errors import ConversionError
from tasks.kinds import trtllm_engines as engines
from tasks.kinds.trtllm_engines import build_engine_step, engine_builder_problem, option_args
from tasks.storage.base import ArtifactStore
from tasks.storage.store import open_store

FAKE = Path(__file__).with_name("fake_trtllm_build.py")
WORLD = 2


def write_checkpoint(store: ArtifactStore, tmp: Path, world: int = WORLD) -> None:
    """A tiny TensorRT-LLM checkpoint (config.json, rank{N}.safetensors) put into `store`."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = {
        "architecture": "LlamaForCausalLM",
        "dtype": "float32",
        "vocab_size": 32,
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "mapping": {"world_size": world, "tp_size": world, "pp_size": 1},
    }
    (tmp / "config.json").write_text(json.dumps(config))
    store.put_file(tmp / "config.json", "config.json")
    for rank in range(world):
        rng = np.random.default_rng(rank)
        tensors = {"transformer.vocab_embedding.weight": rng.standard_normal((32, 8 // world))}
        save_file({k: v.astype(np.float32) for k, v in tensors.items()}, tmp / f"r{rank}")
        store.put_file(tmp / f"r{rank}", f"rank{rank}.safetensors")


def expected_engine(store: ArtifactStore, tmp: Path, rank: int, options: dict) -> bytes:
    """What the stand-in writes for these inputs (recomputed here from the stored checkpoint)."""
    digest = hashlib.sha256()
    for key in ("config.json", f"rank{rank}.safetensors"):
        store.get_file(key, tmp / key)
        digest.update((tmp / key).read_bytes())
    digest.update(json.dumps(options, sort_keys=True).encode())
    return b"FAKE-TRT-ENGINE\n" + f"rank={rank}\n".encode() + digest.hexdigest().encode() + b"\n"


FAKE_DEFAULTS = {
    "max_batch_size": 8,
    "max_input_len": 1024,
    "max_seq_len": None,
    "gemm_plugin": "auto",
    "strip_plan": False,
    "lora_target_modules": None,
}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Point PORTER_TRTLLM_BUILD at the stand-in; `calls()` → its recorded invocations."""
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PORTER_TRTLLM_BUILD", shlex.join([sys.executable, str(FAKE)]))
    monkeypatch.setenv("FAKE_TRTLLM_LOG", str(log))
    for name in ("FAKE_TRTLLM_FAIL", "FAKE_TRTLLM_NO_ENGINE"):
        monkeypatch.delenv(name, raising=False)
    return lambda: (
        [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    )


@pytest.fixture
def scratch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The temp dir the step builds in, to check it is cleaned up."""
    path = tmp_path / "scratch"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


@pytest.fixture
def local_out(tmp_path: Path) -> str:
    out = tmp_path / "store" / "job1"
    write_checkpoint(open_store(out), tmp_path / "ckpt")
    return str(out)


def _arg(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_builds_exactly_one_rank_and_uploads_it(calls, scratch, local_out, tmp_path):
    options = {"max_batch_size": 4, "strip_plan": True, "lora_target_modules": ["attn_q", "attn_k"]}
    result = build_engine_step(local_out, "job1", 1, WORLD, tag="tag-a", options=options)

    (call,) = calls()
    assert _arg(call["argv"], "--rank") == "1"
    assert call["checkpoint_files"] == ["config.json", "rank1.safetensors"]
    assert Path(_arg(call["argv"], "--checkpoint_dir")).name == "checkpoint"
    assert Path(_arg(call["argv"], "--output_dir")).name == "engine"
    assert "--max_batch_size=4" in call["argv"] and "--strip_plan" in call["argv"]
    assert call["options"] == {**FAKE_DEFAULTS, **options}

    store = open_store(local_out)
    assert [f["file"] for f in result["files"]] == ["engines/rank1.engine"]  # config: rank 0's
    assert result["rank"] == 1 and result["reused"] is False and result["seconds"] >= 0
    art = store.stat("engines/rank1.engine")
    assert art.tag == "tag-a"
    want = expected_engine(store, tmp_path / "check", 1, {**FAKE_DEFAULTS, **options})
    assert art.sha256 == hashlib.sha256(want).hexdigest() == result["files"][0]["sha256"]
    assert art.bytes == len(want) == result["files"][0]["bytes_written"]
    store.get_file("engines/rank1.engine", tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == want
    assert list(scratch.iterdir()) == []


def test_rank0_also_uploads_the_engine_config(calls, local_out):
    result = build_engine_step(local_out, "job1", 0, WORLD, tag="tag-a")
    assert [f["file"] for f in result["files"]] == ["engines/config.json", "engines/rank0.engine"]
    store = open_store(local_out)
    config = json.loads((Path(local_out) / "engines" / "config.json").read_text())
    assert config["pretrained_config"]["mapping"]["world_size"] == WORLD
    assert store.stat("engines/config.json").tag == "tag-a"
    other = build_engine_step(local_out, "job1", 1, WORLD, tag="tag-a")
    assert other["files"][0]["sha256"] != result["files"][1]["sha256"]


def test_rerun_with_same_tag_does_not_build_again(calls, local_out):
    first = build_engine_step(local_out, "job1", 0, WORLD, tag="tag-a")
    again = build_engine_step(local_out, "job1", 0, WORLD, tag="tag-a")
    assert len(calls()) == 1
    assert again["reused"] is True and again["files"] == first["files"]

    other_tag = build_engine_step(local_out, "job1", 0, WORLD, tag="tag-b")
    assert len(calls()) == 2 and other_tag["reused"] is False
    assert open_store(local_out).stat("engines/rank0.engine").tag == "tag-b"


def test_s3_store_over_http(calls, scratch, s3_env, tmp_path):
    uri = f"s3://{s3_env}/jobs/job1"
    store = open_store(uri)
    write_checkpoint(store, tmp_path / "ckpt")

    results = [build_engine_step(uri, "job1", r, WORLD, tag="tag-s3") for r in range(WORLD)]
    assert [c["checkpoint_files"] for c in calls()] == [
        ["config.json", f"rank{r}.safetensors"] for r in range(WORLD)
    ]
    assert store.list("engines/") == [
        "engines/config.json",
        "engines/rank0.engine",
        "engines/rank1.engine",
    ]
    for rank, result in enumerate(results):
        art = store.stat(f"engines/rank{rank}.engine")
        assert art.tag == "tag-s3" and art.sha256 == result["files"][-1]["sha256"]
        want = expected_engine(store, tmp_path / f"check{rank}", rank, FAKE_DEFAULTS)
        store.get_file(f"engines/rank{rank}.engine", tmp_path / f"got{rank}")  # verifies sha256
        assert (tmp_path / f"got{rank}").read_bytes() == want

    again = build_engine_step(uri, "job1", 1, WORLD, tag="tag-s3")
    assert len(calls()) == WORLD and again["reused"] is True
    assert again["files"] == results[1]["files"]
    assert list(scratch.iterdir()) == []


def test_failing_builder_raises_with_stderr_tail(calls, scratch, local_out, monkeypatch):
    monkeypatch.setenv("FAKE_TRTLLM_FAIL", "CUDA out of memory while building rank")
    with pytest.raises(ConversionError) as err:
        build_engine_step(local_out, "job1", 1, WORLD, tag="tag-a")
    message = str(err.value)
    assert "CUDA out of memory while building rank" in message
    assert "fake_trtllm_build.py" in message and "status 1" in message
    assert "noise line 199" in message and "noise line 100" not in message  # only the tail
    assert open_store(local_out).list("engines/") == []
    assert list(scratch.iterdir()) == []


def test_unknown_option_is_the_builders_argparse_error(calls, local_out):
    with pytest.raises(ConversionError, match="unrecognized arguments: --no_such_option=1"):
        build_engine_step(local_out, "job1", 0, WORLD, tag="t", options={"no_such_option": 1})


def test_builder_that_writes_no_engine(calls, local_out, monkeypatch):
    monkeypatch.setenv("FAKE_TRTLLM_NO_ENGINE", "1")
    with pytest.raises(ConversionError, match=r"wrote no rank0\.engine"):
        build_engine_step(local_out, "job1", 0, WORLD, tag="t")
    assert open_store(local_out).list("engines/") == []


@pytest.mark.parametrize(
    "options",
    [
        {"output_dir": "/elsewhere"},
        {"model_cls_file": "/tmp/x.py"},
        {"Bad-Name": 1},
        {"max_batch_size": {"a": 1}},
        {"lora_target_modules": ["--output_dir"]},
    ],
)
def test_rejected_options_never_reach_the_builder(calls, local_out, options):
    with pytest.raises(ConversionError, match="engine build option"):
        build_engine_step(local_out, "job1", 0, WORLD, tag="t", options=options)
    assert calls() == []


def test_option_args():
    options = {"max_batch_size": 8, "strip_plan": True, "fast_build": False, "max_seq_len": None}
    assert option_args(options) == ["--max_batch_size=8", "--strip_plan"]
    assert option_args({"lora_target_modules": ["attn_q"]}) == ["--lora_target_modules", "attn_q"]


def test_missing_rank_file_names_it(calls, local_out):
    Path(local_out, "rank1.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"rank1\.safetensors"):
        build_engine_step(local_out, "job1", 1, WORLD, tag="t")
    assert calls() == []


def test_world_size_must_match_the_checkpoint(calls, local_out):
    with pytest.raises(ConversionError, match="world size 2, the job expects 4"):
        build_engine_step(local_out, "job1", 3, 4, tag="t")
    with pytest.raises(ConversionError, match="outside world size"):
        build_engine_step(local_out, "job1", 2, WORLD, tag="t")
    assert calls() == []


def test_missing_builder_command(local_out, monkeypatch):
    monkeypatch.setenv("PORTER_TRTLLM_BUILD", "/nonexistent/trtllm-build --x")
    problem = engine_builder_problem()
    assert problem is not None and "/nonexistent/trtllm-build" in problem
    with pytest.raises(ConversionError, match="cannot run the engine builder"):
        build_engine_step(local_out, "job1", 0, WORLD, tag="t")


def test_no_gpu_visible_is_a_problem(calls, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    problem = engine_builder_problem()
    assert problem is not None and "GPU" in problem


tensorrt_llm_missing = pytest.mark.skipif(
    __import__("importlib").util.find_spec("tensorrt_llm") is not None,
    reason="TensorRT-LLM is installed here",
)


@tensorrt_llm_missing
def test_default_builder_without_tensorrt_llm(local_out, monkeypatch):
    monkeypatch.delenv("PORTER_TRTLLM_BUILD", raising=False)
    assert engines.builder_command() == [sys.executable, "-m", "tasks.kinds.trtllm_engines"]
    assert "TensorRT-LLM is not installed" in engine_builder_problem()
    with pytest.raises(ConversionError, match="TensorRT-LLM is not installed") as err:
        build_engine_step(local_out, "job1", 0, WORLD, tag="t")
    assert "-m tasks.kinds.trtllm_engines" in str(err.value)


def test_default_builder_needs_a_rank():
    with pytest.raises(SystemExit, match="--rank N"):
        engines.main(["--checkpoint_dir", "x"])
    assert engines._split_rank(["--rank", "3", "--checkpoint_dir", "x"]) == (
        3,
        ["--checkpoint_dir", "x"],
    )
    assert engines._split_rank(["--rank=0"]) == (0, [])
