"""Bad input: each case fails with one clear line naming the file, exits non-zero, publishes nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.cli.main import main
from tests.conftest import LAYOUTS

LEGACY_TP2 = LAYOUTS[1]
RANK1 = "iter_0000010/mp_rank_01/model_optim_rng.pt"


@pytest.fixture
def llama_tp2(megatron, tmp_path) -> Path:
    """A private copy of the real legacy TP=2 Llama checkpoint, safe to damage."""
    copy = tmp_path / "source"
    shutil.copytree(megatron("llama").paths[LEGACY_TP2], copy)
    return copy


def rewrite(path: Path, change) -> None:
    """Load a (trusted, test-written) rank file, apply `change` to its dict, save it back."""
    payload = torch.load(path, weights_only=False)
    change(payload)
    torch.save(payload, path)


def run_convert(capsys, source: Path, output: Path, *options: str) -> tuple[int, str]:
    code = main(["convert", "megatron-trtllm", str(source), str(output), "--quiet", *options])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_failed_cleanly(code: int, err: str, output: Path, *fragments: str) -> None:
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert err.startswith("porter: error: ")
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not output.exists() or not any(output.iterdir()), list(output.iterdir())


def test_not_a_megatron_checkpoint(capsys, tmp_path):
    source = tmp_path / "hf-model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    code, err = run_convert(capsys, source, tmp_path / "out", "--tp", "2")
    assert_failed_cleanly(code, err, tmp_path / "out", str(source), "not a Megatron checkpoint")


def test_latest_file_pointing_nowhere(capsys, tmp_path):
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "latest_checkpointed_iteration.txt").write_text("300\n")
    code, err = run_convert(capsys, source, tmp_path / "out", "--tp", "2")
    assert_failed_cleanly(
        code, err, tmp_path / "out", "latest_checkpointed_iteration.txt", "iter_0000300"
    )


def test_missing_rank_directory(capsys, llama_tp2, tmp_path):
    shutil.rmtree(llama_tp2 / "iter_0000010/mp_rank_01")
    code, err = run_convert(capsys, llama_tp2, tmp_path / "out", "--tp", "2")
    assert_failed_cleanly(code, err, tmp_path / "out", "mp_rank_01", "missing rank directory")


def test_truncated_pt(capsys, llama_tp2, tmp_path):
    path = llama_tp2 / RANK1
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    code, err = run_convert(capsys, llama_tp2, tmp_path / "out", "--tp", "2")
    assert_failed_cleanly(code, err, tmp_path / "out", str(path), "truncated")


def test_corrupted_pickle(capsys, llama_tp2, tmp_path):
    path = llama_tp2 / RANK1
    data = bytearray(path.read_bytes())
    start = data.index(b"data.pkl") + 60  # inside the pickle stream of the zip archive
    data[start : start + 64] = os.urandom(64)
    path.write_bytes(bytes(data))
    code, err = run_convert(capsys, llama_tp2, tmp_path / "out", "--tp", "2")
    assert_failed_cleanly(code, err, tmp_path / "out", str(path))


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_unexpected_class_is_not_executed(capsys, llama_tp2, tmp_path):
    marker = tmp_path / "pwned"
    path = llama_tp2 / RANK1
    rewrite(path, lambda payload: payload.update(rng_state=_Payload(marker)))
    code, err = run_convert(capsys, llama_tp2, tmp_path / "out", "--tp", "2")
    assert_failed_cleanly(
        code, err, tmp_path / "out", str(path), "system", "nothing from the file was executed"
    )
    assert not marker.exists()


def test_heads_not_divisible_by_tp(capsys, llama_tp2, tmp_path):
    code, err = run_convert(capsys, llama_tp2, tmp_path / "out", "--tp", "3")
    assert_failed_cleanly(
        code, err, tmp_path / "out", str(llama_tp2), "num_attention_heads=8", "TP=3"
    )


def test_groups_not_divisible_by_tp(capsys, llama_tp2, tmp_path):
    def six_groups(payload):
        payload["args"].num_attention_heads = 12
        payload["args"].num_query_groups = 6

    for rank in ("mp_rank_00", "mp_rank_01"):
        rewrite(llama_tp2 / f"iter_0000010/{rank}/model_optim_rng.pt", six_groups)
    code, err = run_convert(capsys, llama_tp2, tmp_path / "out", "--tp", "4")
    assert_failed_cleanly(code, err, tmp_path / "out", str(llama_tp2), "num_query_groups=6", "TP=4")


def test_shards_whose_shapes_disagree(capsys, llama_tp2, tmp_path):
    path = llama_tp2 / RANK1
    key = "decoder.layers.1.self_attention.linear_proj.weight"
    rewrite(path, lambda payload: payload["model"].__setitem__(key, torch.zeros(64, 40)))
    # Two workers: the error crosses the process boundary intact.
    code, err = run_convert(capsys, llama_tp2, tmp_path / "out", "--tp", "2", "--workers", "2")
    assert_failed_cleanly(code, err, tmp_path / "out", str(path), key, "(64, 40)", "(64, 32)")


def test_unknown_parameter_names_are_listed(capsys, llama_tp2, tmp_path):
    path = llama_tp2 / "iter_0000010/mp_rank_00/model_optim_rng.pt"

    def add_router(payload):
        payload["model"]["decoder.layers.0.mlp.router.weight"] = torch.zeros(4, 64)
        payload["model"]["decoder.layers.1.mlp.experts.linear_fc1.weight0"] = torch.zeros(4, 64)

    rewrite(path, add_router)
    code, err = run_convert(capsys, llama_tp2, tmp_path / "out", "--tp", "2")
    assert_failed_cleanly(
        code,
        err,
        tmp_path / "out",
        str(path),
        "unknown parameter names",
        "decoder.layers.0.mlp.router.weight",
        "decoder.layers.1.mlp.experts.linear_fc1.weight0",
    )


@pytest.mark.parametrize(
    ("argument", "value", "feature"),
    [
        ("multi_latent_attention", True, "multi-latent attention"),
        ("rotary_interleaved", True, "interleaved rotary"),
    ],
)
def test_unsupported_feature_says_so(capsys, llama_tp2, tmp_path, argument, value, feature):
    path = llama_tp2 / "iter_0000010/mp_rank_00/model_optim_rng.pt"
    rewrite(path, lambda payload: setattr(payload["args"], argument, value))
    code, err = run_convert(capsys, llama_tp2, tmp_path / "out", "--tp", "2")
    assert_failed_cleanly(code, err, tmp_path / "out", str(path), feature, "not supported")


def test_qk_layernorm_argument_without_its_weights_is_refused(capsys, llama_tp2, tmp_path):
    """`args.qk_layernorm` set but no q/k norm weights stored: the Qwen3 family would need them."""
    path = llama_tp2 / "iter_0000010/mp_rank_00/model_optim_rng.pt"
    rewrite(path, lambda payload: setattr(payload["args"], "qk_layernorm", True))
    code, err = run_convert(capsys, llama_tp2, tmp_path / "out", "--tp", "2")
    assert_failed_cleanly(code, err, tmp_path / "out", str(llama_tp2), "q_layernorm")


def test_output_not_empty_is_refused_and_left_alone(capsys, llama_tp2, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    code, err = run_convert(capsys, llama_tp2, output, "--tp", "2")
    assert code != 0 and "not empty" in err and str(output) in err
    assert [p.name for p in output.iterdir()] == ["notes.txt"]


def test_cli_process_exit_codes_and_idempotent_rerun(llama_tp2, tmp_path):
    """The installed `porter` script: exit 0 and a summary; the same job again is a no-op."""
    output = tmp_path / "out"
    porter = [
        sys.executable,
        "-m",
        "tasks.cli",
        "convert",
        "megatron-trtllm",
        str(llama_tp2),
        str(output),
    ]
    done = subprocess.run(
        [*porter, "--tp", "4", "--workers", "2"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "rank" in done.stdout and "peak anon" in done.stdout
    again = subprocess.run([*porter, "--tp", "4"], capture_output=True, text=True, check=False)
    assert again.returncode == 0 and "already converted" in again.stdout
    other = subprocess.run([*porter, "--tp", "2"], capture_output=True, text=True, check=False)
    assert other.returncode == 1
    assert other.stderr.count("\n") == 1 and "another conversion" in other.stderr
