"""Hostile input: files and job specs made to run code, exhaust memory or escape their directory.

Each case ends with one clear error naming the file (or spec field) and the problem, the CLI exits 1
or the queued job ends FAILED, and nothing is published. Pickle payloads would create a marker
file if they ran: the marker never exists. Inputs that claim huge sizes are opened in a child
process under an address-space limit (RLIMIT_AS), so a regression that tries to allocate fails the
test with the allocator's message instead of exhausting this machine.
(Plain damage — truncated rank file, wrong shapes, unknown names — is in test_bad_input.py.)
"""

from __future__ import annotations

import os
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from converters.errors import ConversionError, NonFiniteWeights
from converters.megatron.example import Layout
from converters.powerinfer.errors import CorruptGpuIndex
from converters.powerinfer.gpuindex import read_gpu_index
from tasks.cli.main import main
from tasks.executors.local import run_conversion
from tasks.jobs.checks import InvalidSpec
from tasks.jobs.records import JobRecords
from tasks.kinds.megatron_trtllm import ConvertSpec
from tasks.storage.store import open_store
from tests.test_distributed import upload, wait_state

LEGACY_TP2 = Layout("legacy", 2, 1)
DIST_TP2 = Layout("torch_dist", 2, 1)
RANK1 = "iter_0000010/mp_rank_01/model_optim_rng.pt"
N_FF = 512
WORDS = "embedding.word_embeddings.weight"


# ----------------------------------------------------------------------------------------------
# Sources to damage
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def legacy(megatron, tmp_path) -> Path:
    """A private copy of the real legacy TP=2 Llama checkpoint."""
    return Path(shutil.copytree(megatron("llama").paths[LEGACY_TP2], tmp_path / "legacy"))


@pytest.fixture
def dist(megatron, tmp_path) -> Path:
    """A private copy of the real torch_dist TP=2 Llama checkpoint (root)."""
    return Path(shutil.copytree(megatron("llama").paths[DIST_TP2], tmp_path / "dist"))


@pytest.fixture
def activations(tmp_path) -> Path:
    directory = tmp_path / "activation"
    directory.mkdir()
    for layer in range(4):
        torch.save(torch.rand(N_FF), directory / f"activation_{layer}.pt")
    return directory


def iteration(root: Path) -> Path:
    return next(root.glob("iter_*"))


def rewrite_trusted(path: Path, change) -> None:
    """Load a rank file this test session wrote itself (trusted), change it, save it back."""
    payload = torch.load(path, weights_only=False)
    change(payload)
    torch.save(payload, path)


def write_metadata(path: Path, change) -> None:
    """Read a `.metadata` this test session wrote itself (trusted: torch's own classes), change
    it, pickle it back."""
    metadata = pickle.loads(path.read_bytes())
    change(metadata)
    path.write_bytes(pickle.dumps(metadata))


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def plant_payload(kind: str, legacy: Path, dist: Path, activations: Path, marker: Path) -> Path:
    """Put a code-running pickle into one file of a source; returns that file."""
    if kind == "model_optim_rng.pt":
        path = legacy / RANK1  # the second rank: found by a rank step, not at planning
        rewrite_trusted(path, lambda p: p.update(rng_state=Payload(marker)))
    elif kind == "common.pt":
        path = iteration(dist) / "common.pt"
        rewrite_trusted(path, lambda p: p.update(extra=Payload(marker)))
    elif kind == ".metadata":
        path = iteration(dist) / ".metadata"
        write_metadata(path, lambda md: setattr(md, "planner_data", {"x": Payload(marker)}))
    else:
        path = activations / "activation_2.pt"
        torch.save(Payload(marker), path)
    return path


def source_of(kind: str, legacy: Path, dist: Path, activations: Path) -> Path:
    return {"model_optim_rng.pt": legacy, "activation": activations}.get(kind, dist)


def convert_args(kind: str, source: str, output: str) -> list[str]:
    if kind == "activation":
        return ["powerinfer-index", source, output, "--vram-capacity", "1000", "--capacity", "512"]
    return ["megatron-trtllm", source, output, "--tp", "2"]


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main([*args])
    return code, capsys.readouterr().err.strip()


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1, err
    assert len(err.splitlines()) == 1 and err.startswith("porter: error: "), err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def assert_nothing_published(output: Path) -> None:
    assert not output.exists() or not any(output.iterdir()), list(output.iterdir())


PAYLOAD_FILES = ["model_optim_rng.pt", "common.pt", ".metadata", "activation"]


# ----------------------------------------------------------------------------------------------
# Pickles that would run code
# ----------------------------------------------------------------------------------------------


def test_the_payload_does_run_when_unpickled_naively(tmp_path):
    """Control: the payload is live, so its marker staying absent below means something."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("kind", PAYLOAD_FILES)
def test_code_running_pickle_is_refused_locally(capsys, legacy, dist, activations, tmp_path, kind):
    marker = tmp_path / "pwned"
    path = plant_payload(kind, legacy, dist, activations, marker)
    source = source_of(kind, legacy, dist, activations)
    output = tmp_path / ("out.gpuidx" if kind == "activation" else "out")
    code, err = run_cli(capsys, "convert", *convert_args(kind, str(source), str(output)))
    assert_one_line_error(code, err, str(path), "system", "nothing")
    assert not marker.exists()
    assert not output.exists() or (output.is_dir() and not any(output.iterdir()))


@pytest.mark.parametrize("kind", PAYLOAD_FILES)
def test_code_running_pickle_from_s3_fails_the_queued_job(
    cluster, s3_env, legacy, dist, activations, tmp_path, kind
):
    marker = tmp_path / "pwned"  # the workers run on this machine: they would create it
    path = plant_payload(kind, legacy, dist, activations, marker)
    source = source_of(kind, legacy, dist, activations)
    upload(source, f"s3://{s3_env}/src")
    result = cluster.porter(
        "submit", *convert_args(kind, f"s3://{s3_env}/src", f"s3://{s3_env}/out")
    )
    assert result.returncode == 0, result.stderr
    job = result.stdout.splitlines()[0]
    record = wait_state(JobRecords(cluster.redis_url), job, ("FAILED", "SUCCEEDED"))
    assert record["state"] == "FAILED"
    uri = f"s3://{s3_env}/src/{path.relative_to(source).as_posix()}"
    assert uri in record["error"] and "nothing" in record["error"], record["error"]
    assert "system" in record["error"]
    first_read_by = {"model_optim_rng.pt": "reshard:", "activation": "stats:"}.get(kind, "inspect:")
    assert record["error"].startswith(first_read_by), record["error"]
    assert not marker.exists()
    assert open_store(f"s3://{s3_env}/out").list() == []


# ----------------------------------------------------------------------------------------------
# Empty, random and truncated files
# ----------------------------------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    size = path.stat().st_size
    if how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(os.urandom(max(size, 64)))
    else:
        path.write_bytes(path.read_bytes()[: size // 2])


DAMAGED = [
    (name, how)
    for name in ("model_optim_rng.pt", "common.pt", ".metadata", "__0_0.distcp", "activation")
    for how in ("empty", "random", "truncated")
    if (name, how) != ("model_optim_rng.pt", "truncated")  # test_bad_input has it
]


@pytest.mark.parametrize(("name", "how"), DAMAGED, ids=[f"{n}-{h}" for n, h in DAMAGED])
def test_empty_random_or_truncated_file(capsys, legacy, dist, activations, tmp_path, name, how):
    if name == "model_optim_rng.pt":
        source, path = legacy, legacy / RANK1
    elif name == "activation":
        source, path = activations, activations / "activation_1.pt"
    else:
        source, path = dist, iteration(dist) / name
    _damage(path, how)
    kind = "activation" if name == "activation" else "megatron"
    output = tmp_path / "out"
    code, err = run_cli(capsys, "convert", *convert_args(kind, str(source), str(output)))
    assert_one_line_error(code, err, str(path))
    assert_nothing_published(output)


# ----------------------------------------------------------------------------------------------
# Absurd sizes: refused before allocating, in a child process with bounded address space
# ----------------------------------------------------------------------------------------------

ADDRESS_SPACE = 3 * 2**30  # Python + torch need about 1 GiB of address space; a bomb needs more
BOMB_BYTES = 3 * 2**30 + 2**29  # what the zip bomb inflates to (from a few MiB)


def run_limited(*args: str) -> tuple[int, str, float]:
    """`porter ARGS` in a child process limited to ADDRESS_SPACE; (exit status, stderr, seconds)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    return done.returncode, done.stderr.strip(), time.monotonic() - started


def _long1(n: int) -> bytes:
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def _text(s: str) -> bytes:
    return b"X" + len(s).to_bytes(4, "little") + s.encode()


def forged_tensor_file(path: Path, numel: int) -> None:
    """A torch.save zip whose pickle claims a float tensor of `numel` elements over 16 bytes."""
    pkl = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(("
    pkl += _text("storage") + b"ctorch\nFloatStorage\n" + _text("0") + _text("cpu")
    pkl += _long1(numel) + b"tQK\x00(" + _long1(numel) + b"t(K\x01t"
    pkl += b"\x89ccollections\nOrderedDict\n)RtR."
    writer = torch._C.PyTorchFileWriter(str(path))
    for name, data in (("data.pkl", pkl), ("byteorder", b"little"), ("data/0", b"\0" * 16),
                       ("version", b"3\n")):  # fmt: skip
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()


def write_zip(path: Path, records: list[tuple[str, bytes, int, int]]) -> None:
    """A zip of (name, stored bytes, method, uncompressed size) records, written field by field so
    a record can claim any method and size (CRCs are left 0: a reader inflates before checking)."""
    out, central = bytearray(), bytearray()
    for name, data, method, size in records:
        raw = name.encode()
        header = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, 0, len(data),
                             size, len(raw), 0)  # fmt: skip
        central += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, 0,
                               len(data), size, len(raw), 0, 0, 0, 0, 0, len(out)) + raw  # fmt: skip
        out += header + raw + data
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(records), len(records), len(central),
                      len(out), 0)  # fmt: skip
    path.write_bytes(bytes(out + central + end))


def plant_zip_bomb(path: Path) -> None:
    """Replace `path` (a torch.save zip) by the same records with data.pkl a deflated record that
    inflates to BOMB_BYTES zeros: a few MiB on disk (one fully flushed deflate block, repeated)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(b"\0" * 2**24) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream = block * (BOMB_BYTES // 2**24) + b"\x03\x00"  # then an empty final block
    with zipfile.ZipFile(path) as original:
        records = [
            (i.filename, stream, zipfile.ZIP_DEFLATED, BOMB_BYTES)
            if i.filename.endswith("data.pkl")
            else (i.filename, original.read(i), zipfile.ZIP_STORED, i.file_size)
            for i in original.infolist()
        ]
    write_zip(path, records)


def _expanded_weight(legacy: Path) -> str:
    """A stride-0 view claiming 10^12 elements (4 TB as float32) over a 4-byte storage."""
    rewrite_trusted(
        legacy / RANK1, lambda p: p["model"].update(huge=torch.zeros(1).expand(10**6, 10**6))
    )
    return "expanded"


def _expanded_activation(activations: Path) -> str:
    torch.save(torch.ones(1).expand(10**10), activations / "activation_1.pt")
    return "expanded"


def _forged_activation(activations: Path) -> str:
    forged_tensor_file(activations / "activation_1.pt", 10**12)
    return "claims more elements than its storage record holds"


def _bomb_rank(legacy: Path) -> str:
    plant_zip_bomb(legacy / RANK1)
    return "is compressed"


def _bomb_activation(activations: Path) -> str:
    plant_zip_bomb(activations / "activation_1.pt")
    return "is compressed"


def _bomb_chunk(dist: Path) -> str:
    """A chunk of the word embeddings moved to a zip bomb appended to its .distcp file."""
    md_path = iteration(dist) / ".metadata"
    storage = pickle.loads(md_path.read_bytes()).storage_data  # trusted: written by this session
    index = next(i for i in storage if i.fqn == WORDS and i.offset)
    blob = iteration(dist) / "blob.pt"
    torch.save(torch.zeros(3), blob)
    plant_zip_bomb(blob)
    bomb = blob.read_bytes()
    blob.unlink()

    def point_at_bomb(md) -> None:
        info = md.storage_data[index]
        data = iteration(dist) / info.relative_path
        info.offset, info.length = data.stat().st_size, len(bomb)
        with data.open("ab") as f:
            f.write(bomb)

    write_metadata(md_path, point_at_bomb)
    return "is compressed"


def _huge_chunk_sizes(dist: Path) -> str:
    """`.metadata` claiming a 10^12-row embedding in one chunk of the real bytes."""

    def grow(md) -> None:
        entry = md.state_dict_metadata[WORDS]
        entry.size = torch.Size([10**12, *entry.size[1:]])
        entry.chunks[0].sizes = torch.Size([10**12, *entry.chunks[0].sizes[1:]])

    write_metadata(iteration(dist) / ".metadata", grow)
    return WORDS


def _huge_chunk_length(dist: Path) -> str:
    """`.metadata` saying a chunk's bytes run 2^60 past its offset."""

    def stretch(md) -> None:
        next(v for i, v in md.storage_data.items() if i.fqn == WORDS).length = 2**60

    write_metadata(iteration(dist) / ".metadata", stretch)
    return "truncated"


HUGE = {
    "expanded-weight-in-rank-file": ("legacy", _expanded_weight),
    "expanded-activation": ("activations", _expanded_activation),
    "activation-claiming-1e12-elements": ("activations", _forged_activation),
    "zip-bomb-rank-file": ("legacy", _bomb_rank),
    "zip-bomb-activation": ("activations", _bomb_activation),
    "zip-bomb-distcp-chunk": ("dist", _bomb_chunk),
    "metadata-1e12-row-chunk": ("dist", _huge_chunk_sizes),
    "metadata-2^60-byte-chunk": ("dist", _huge_chunk_length),
}


@pytest.mark.parametrize("case", list(HUGE))
def test_absurd_sizes_are_refused_before_allocating(legacy, dist, activations, tmp_path, case):
    where, plant = HUGE[case]
    source = {"legacy": legacy, "dist": dist, "activations": activations}[where]
    expected = plant(source)
    kind = "activation" if where == "activations" else "megatron"
    output = tmp_path / "out"
    code, err, seconds = run_limited("convert", *convert_args(kind, str(source), str(output)))
    assert code == 1, err
    assert len(err.splitlines()) == 1 and expected in err, err
    assert "allocate" not in err.replace("before allocating", "")  # not the allocator giving up
    assert seconds < 60
    assert_nothing_published(output)


def test_gpu_index_with_2_to_the_60_counts_is_refused_quickly(tmp_path):
    """GGUF-style count and length fields of 2^60 (like a forged safetensors header size)."""
    path = tmp_path / "forged.gpuidx"
    header = b"PWRI" + struct.pack("<IQQ", 3, 2**60, 2**60)
    for body in (b"", struct.pack("<Q", 2**60) + b"key", struct.pack("<Q", 3) + b"key" +
                 struct.pack("<IIQ", 9, 4, 2**60)):  # fmt: skip
        path.write_bytes(header + body)
        started = time.monotonic()
        with pytest.raises(CorruptGpuIndex, match="truncated") as err:
            read_gpu_index(path)
        assert time.monotonic() - started < 1 and str(path) in str(err.value)


# ----------------------------------------------------------------------------------------------
# NaN and infinite weights: reported by default, refused on request
# ----------------------------------------------------------------------------------------------

DENSE = "decoder.layers.1.self_attention.linear_proj.weight"


def _poison(legacy: Path) -> None:
    def change(payload):
        weight = payload["model"][DENSE].clone()
        weight[0, 0], weight[1, 2] = float("nan"), float("inf")
        payload["model"][DENSE] = weight

    rewrite_trusted(legacy / RANK1, change)


def test_nan_weights_are_reported_by_default(legacy, tmp_path):
    _poison(legacy)
    summary = run_conversion(ConvertSpec(str(legacy), str(tmp_path / "out"), tp=2), workers=1)
    reports = {r["rank"]: r["nonfinite"] for r in summary.fanned("reshard")}
    assert reports[0] == []  # rank 0's half of the columns comes from mp_rank_00
    [found] = reports[1]
    assert found["tensor"] == "transformer.layers.1.attention.dense.weight"
    assert found["count"] == 2 and found["files"] == [str(legacy / RANK1)]
    assert (tmp_path / "out" / "manifest.json").exists()


def test_nan_weights_are_refused_with_nonfinite_error(legacy, tmp_path):
    _poison(legacy)
    output = tmp_path / "out"
    spec = ConvertSpec(str(legacy), str(output), tp=2, nonfinite="error")
    with pytest.raises(NonFiniteWeights) as err:
        run_conversion(spec, workers=1)
    message = str(err.value)
    assert str(legacy / RANK1) in message and "attention.dense.weight" in message
    assert "2 NaN or infinite" in message
    assert_nothing_published(output)


def test_nan_weights_from_s3_are_listed_in_the_queued_rank_result(cluster, s3_env, legacy):
    _poison(legacy)
    upload(legacy, f"s3://{s3_env}/src")
    result = cluster.porter("submit", "megatron-trtllm", f"s3://{s3_env}/src",
                            f"s3://{s3_env}/out", "--tp", "2", "--wait")  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = JobRecords(cluster.redis_url).get(result.stdout.splitlines()[0])
    [found] = record["steps"]["reshard:1"]["nonfinite"]
    assert found["files"] == [f"s3://{s3_env}/src/{RANK1}"] and found["count"] == 2
    assert record["steps"]["reshard:0"]["nonfinite"] == []


# ----------------------------------------------------------------------------------------------
# Path traversal: trackers, chunk file names, S3 keys, specs
# ----------------------------------------------------------------------------------------------

TRACKERS = {
    "parent": "../../etc",
    "absolute": "/etc",
    "nul": "10\x00/../../x",
    "unicode-digit": "\u00b2",
    "5000-digits": "9" * 5000,
}


@pytest.mark.parametrize("name", list(TRACKERS))
def test_tracker_pointing_outside_is_refused(capsys, legacy, tmp_path, name):
    tracker = legacy / "latest_checkpointed_iteration.txt"
    tracker.write_text(TRACKERS[name])
    code, err = run_cli(capsys, "convert", *convert_args("m", str(legacy), str(tmp_path / "o")))
    assert_one_line_error(code, err, str(tracker))
    assert_nothing_published(tmp_path / "o")


def test_tracker_pointing_outside_on_s3_is_refused_at_submit(cluster, s3_env, legacy):
    (legacy / "latest_checkpointed_iteration.txt").write_text("../../etc")
    upload(legacy, f"s3://{s3_env}/src")
    result = cluster.porter(
        "submit", *convert_args("m", f"s3://{s3_env}/src", f"s3://{s3_env}/out")
    )
    assert result.returncode == 1 and result.stdout == ""
    assert f"s3://{s3_env}/src/latest_checkpointed_iteration.txt" in result.stderr
    assert "not a number" in result.stderr and "../../etc" not in result.stderr  # never quoted


@pytest.mark.parametrize("name", ["../__0_0.distcp", "/etc/passwd", "__0_0\x00.distcp"])
def test_metadata_naming_a_file_outside_is_refused(capsys, dist, tmp_path, name):
    def point_outside(md) -> None:
        for info in md.storage_data.values():
            info.relative_path = name

    write_metadata(iteration(dist) / ".metadata", point_outside)
    code, err = run_cli(capsys, "convert", *convert_args("m", str(dist), str(tmp_path / "o")))
    assert_one_line_error(code, err, ".metadata", "outside the checkpoint directory")


def test_s3_key_with_dot_dot_in_the_source_is_refused(capsys, s3_env, legacy, tmp_path):
    upload(legacy, f"s3://{s3_env}/src")
    client = open_store(f"s3://{s3_env}").client
    client.put_object(Bucket=s3_env, Key="src/iter_0000010/mp_rank_00/../../../escape", Body=b"x")
    code, err = run_cli(
        capsys, "convert", *convert_args("m", f"s3://{s3_env}/src", str(tmp_path / "o"))
    )
    assert_one_line_error(code, err, "'..' component", "escape")
    assert_nothing_published(tmp_path / "o")
    assert not (tmp_path.parent / "escape").exists()


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("s3://{bucket}/../x", "'..' component"),
        ("s3://{bucket}/out\x00x", "NUL byte"),
        ("s3://{bucket}/a//x", "empty, '.' or '..' component"),
        ("s3://../x", "not a valid S3 bucket name"),
    ],
)
def test_submit_with_a_traversing_output_is_refused(capsys, s3_env, output, message):
    code, err = run_cli(capsys, "submit", "megatron-trtllm", f"s3://{s3_env}/src",
                        output.format(bucket=s3_env), "--tp", "2")  # fmt: skip
    assert_one_line_error(code, err, "OUTPUT", message)


def test_local_output_with_nul_byte_is_refused(capsys, legacy, tmp_path):
    code, err = run_cli(capsys, "convert", *convert_args("m", str(legacy), f"{tmp_path}/o\x00x"))
    # The CLI resolves the path before the spec check sees it: Python's "embedded null byte".
    assert_one_line_error(code, err)
    assert "nul" in err.lower() and "byte" in err
    assert list(tmp_path.iterdir()) == [legacy]


# ----------------------------------------------------------------------------------------------
# Malformed and oversize job specs
# ----------------------------------------------------------------------------------------------

GOOD = {"source": "s3://bucket-a/ckpt", "output": "s3://bucket-a/out", "tp": 2}
BAD_SPECS = {
    "not-an-object": (["s3://bucket-a/ckpt"], "JSON object"),
    "unknown-key": ({**GOOD, "command": "rm -rf /"}, "unknown field(s) in the job spec: 'command'"),
    "many-unknown-keys": ({**GOOD, **{f"k{i}": i for i in range(100)}}, "and 95 more"),
    "missing-tp": ({"source": GOOD["source"], "output": GOOD["output"]}, "lacks tp"),
    "tp-zero": ({**GOOD, "tp": 0}, "tp=0 is out of range"),
    "tp-1e9": ({**GOOD, "tp": 10**9}, "tp=1000000000 is out of range"),
    "tp-string": ({**GOOD, "tp": "2"}, "tp must be an integer"),
    "tp-float": ({**GOOD, "tp": 2.0}, "tp must be an integer"),
    "tp-bool": ({**GOOD, "tp": True}, "tp must be an integer"),
    "too-many-ranks": ({**GOOD, "tp": 64, "pp": 128}, "8192 ranks"),
    "pp-negative": ({**GOOD, "pp": -1}, "pp=-1 is out of range"),
    "dtype": ({**GOOD, "dtype": "int4"}, "dtype 'int4'"),
    "engines-string": ({**GOOD, "engines": "yes"}, "engines must be true or false"),
    "kind": ({**GOOD, "kind": "powerinfer-index"}, "kind must be 'megatron-trtllm'"),
    "nonfinite": ({**GOOD, "nonfinite": "ignore"}, "nonfinite 'ignore'"),
    "source-not-a-string": ({**GOOD, "source": ["a"]}, "SOURCE must be a string"),
    "huge-source": ({**GOOD, "source": "/" + "a" * 10**7}, "10000001 characters long"),
    "huge-s3-prefix": ({**GOOD, "output": "s3://bucket-a/" + "a" * 2000}, "longer than 900"),
    "control-char": ({**GOOD, "output": "/tmp/out\nx"}, "control character"),
    "other-scheme": ({**GOOD, "source": "file:///etc/passwd"}, "only s3:// URIs and local"),
    "local-dot-dot": ({**GOOD, "output": "/srv/out/../../etc"}, "'..' component"),
    "output-inside-source": ({**GOOD, "output": "s3://bucket-a/ckpt/out"}, "inside SOURCE"),
    "reserved-key": ({**GOOD, "output": "s3://bucket-a/.porter-meta/x"}, "reserved name"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_malformed_spec_is_one_clear_error(case):
    data, message = BAD_SPECS[case]
    started = time.monotonic()
    with pytest.raises(InvalidSpec) as err:
        ConvertSpec.from_dict(data)
    assert message in str(err.value), str(err.value)
    assert len(str(err.value)) < 300  # a huge value is never echoed back whole
    assert isinstance(err.value, ConversionError) and time.monotonic() - started < 1


def test_valid_spec_round_trips_and_keeps_its_job_id_fields():
    spec = ConvertSpec.from_dict(GOOD)
    assert ConvertSpec.from_dict(spec.to_dict()) == spec
    assert "nonfinite" not in spec.to_dict()  # the default leaves job ids as they were
    strict = ConvertSpec.from_dict({**GOOD, "nonfinite": "error"})
    assert strict.to_dict()["nonfinite"] == "error" and strict.target.nonfinite == "error"


def test_hostile_args_in_the_checkpoint_are_one_clear_error(capsys, legacy, tmp_path):
    """A forged `args` must not divide by zero or size tensors (was ZeroDivisionError)."""
    for rank in ("mp_rank_00", "mp_rank_01"):
        path = legacy / f"iter_0000010/{rank}/model_optim_rng.pt"
        rewrite_trusted(path, lambda p: setattr(p["args"], "num_attention_heads", 0))
    code, err = run_cli(capsys, "convert", *convert_args("m", str(legacy), str(tmp_path / "o")))
    assert_one_line_error(code, err, "mp_rank_00/model_optim_rng.pt", "args.num_attention_heads")


def _queue_raw_job(cluster, spec: dict) -> str:
    """Write a job record and its plan message straight into Redis, as anyone who can reach
    Redis can (bypassing `porter submit` and its checks)."""
    from celery import Celery

    job = f"megatron-trtllm-{os.urandom(8).hex()}"
    JobRecords(cluster.redis_url).create(
        job, "megatron-trtllm", spec, output=str(spec.get("output"))
    )
    client = Celery(broker=cluster.redis_url)
    client.conf.task_serializer = "json"
    client.send_task("porter.plan", args=[job], task_id=f"{job}:plan:1", queue="cpu")
    return job


def test_spec_written_straight_into_redis_fails_the_job(cluster, s3_env):
    spec = {"source": f"s3://{s3_env}/src", "output": f"s3://{s3_env}/../escape", "tp": 2}
    job = _queue_raw_job(cluster, spec)
    record = wait_state(JobRecords(cluster.redis_url), job, ("FAILED", "SUCCEEDED"), timeout=8)
    assert record["state"] == "FAILED" and "'..' component" in record["error"], record
