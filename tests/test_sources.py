"""Sources in S3 (moto's server over HTTP): a rank fetches only the bytes it reads into a sparse
mirror, and converting from the mirror gives the same bytes as converting from the local files."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch

from converters.errors import ConversionError, CorruptCheckpoint, NotAMegatronCheckpoint
from converters.megatron.example import Layout
from converters.megatron.layout import open_checkpoint
from converters.torch_zip import check_torch_zip
from converters.trtllm.convert import convert_rank
from converters.trtllm.plan import Target, estimate_rank
from tasks.storage import mirror, ranges, sources, sparse

LEGACY_TP2 = Layout("legacy", 2, 1)
LEGACY_PP2 = Layout("legacy", 1, 2)
DIST_TP2 = Layout("torch_dist", 2, 1)
REPO = Path(__file__).resolve().parents[1]


def upload(bucket: str, root: Path, prefix: str) -> str:
    """Upload every file under `root` to s3://bucket/prefix/...; return that URI."""
    client = boto3.session.Session().client("s3")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def put(bucket: str, key: str, data: bytes) -> None:
    boto3.session.Session().client("s3").put_object(Bucket=bucket, Key=key, Body=data)


def converted(source, target: Target, rank: int, path: Path) -> str:
    """sha256 of the rank file converted from `source`."""
    convert_rank(source, target, rank, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def object_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def storage_bytes(value) -> int:
    """Bytes of the distinct storages of every tensor inside a (nested) container."""
    seen: dict[int, int] = {}

    def walk(v) -> None:
        if isinstance(v, torch.Tensor):
            storage = v.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(v, dict):
            for item in v.values():
                walk(item)
        elif isinstance(v, list | tuple):
            for item in v:
                walk(item)

    walk(value)
    return sum(seen.values())


def present_bytes(cache: Path, uri: str = "s3://") -> int:
    """Bytes recorded as present in a mirror cache, for objects under `uri`."""
    total = 0
    for record in cache.glob("objects/*/*/ranges.json"):
        ranges = json.loads(record.read_text())
        if ranges["uri"].startswith(uri):
            total += sum(end - start for start, end in ranges["ranges"])
    return total


def replicated_bytes(payloads: list[dict]) -> int:
    """Bytes of the model tensors of TP ranks > 0 that equal the first rank's (replicated)."""
    first = payloads[0]["model"]
    return sum(
        value.nbytes
        for payload in payloads[1:]
        for key, value in payload["model"].items()
        if isinstance(value, torch.Tensor) and torch.equal(value, first[key])
    )


def legacy_payloads(root: Path) -> list[dict]:
    return [torch.load(p, mmap=True, weights_only=False) for p in sorted(root.rglob("*.pt"))]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [LEGACY_TP2, LEGACY_PP2, DIST_TP2], ids=lambda x: x.dirname)
def test_rank_from_s3_is_byte_identical(megatron, s3_env, cache, tmp_path, layout):
    root = megatron("llama").paths[layout]
    uri = upload(s3_env, root, "ckpt")
    local = open_checkpoint(root)
    for tp in (1, 2, 4):
        target = Target(tp)
        for rank in range(tp):
            source, stats = sources.open_source_for_rank(uri, target, rank, cache, coalesce_gap=0)
            assert isinstance(source, mirror.MirroredCheckpoint)
            assert source.uri == f"{uri}/iter_0000010" and source.format == layout.format
            want = converted(local, target, rank, tmp_path / "local.safetensors")
            got = converted(source, target, rank, tmp_path / "s3.safetensors")
            assert got == want, f"TP={tp} rank {rank} differs"
            assert stats.bytes_fetched + stats.bytes_cached > 0


def test_local_source_is_opened_in_place(megatron, cache):
    root = megatron("llama").paths[LEGACY_TP2]
    source, stats = sources.open_source_for_rank(str(root), Target(2), 0, cache)
    assert source.path == root / "iter_0000010"
    assert stats == sparse.FetchStats()
    assert not cache.exists()


def test_legacy_rank_fetches_its_share_and_no_optimizer_state(megatron, s3_env, tmp_path):
    root = megatron("llama").paths[LEGACY_TP2]
    uri = upload(s3_env, root, "ckpt")
    total = object_bytes(root)
    payloads = legacy_payloads(root)
    model = sum(storage_bytes(p["model"]) for p in payloads)
    optimizer = sum(storage_bytes(p["optimizer"]) for p in payloads)
    assert optimizer > total / 2  # fp32 Adam moments: most of the file

    sources.open_source(uri, tmp_path / "meta", coalesce_gap=0)
    metadata = present_bytes(tmp_path / "meta")
    assert 0 < metadata < 0.05 * total
    _, stats = sources.open_source_for_rank(uri, Target(1), 0, tmp_path / "meta", coalesce_gap=0)
    # TP=1 reads every weight once (replicated norms from the first shard only), nothing else.
    assert stats.bytes_fetched == model - replicated_bytes(payloads)

    source = open_checkpoint(root)
    for tp in (2, 4):
        fetched = 0
        for rank in range(tp):
            _, stats = sources.open_source_for_rank(
                uri, Target(tp), rank, tmp_path / f"tp{tp}-{rank}", coalesce_gap=0
            )
            weights = stats.bytes_fetched - metadata
            share = estimate_rank(source, Target(tp), rank).bytes_read
            # Column splits read whole row spans, so up to twice the share of those tensors.
            assert share <= weights <= 1.6 * share, (tp, rank, weights, share)
            assert stats.bytes_fetched < 0.4 * total
            fetched += weights
        assert fetched >= model - replicated_bytes(payloads)  # together, the ranks read it all


def test_optimizer_bytes_stay_holes(megatron, s3_env, cache, tmp_path):
    """Non-zero optimizer moments uploaded to S3 read as zeros in the mirror after conversion."""
    root = megatron("llama").paths[LEGACY_TP2]
    copy = tmp_path / "ckpt"
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        dest = copy / path.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix != ".pt":
            dest.write_bytes(path.read_bytes())
            continue
        payload = torch.load(path, weights_only=False)
        for state in payload["optimizer"]["state"].values():
            state["exp_avg"].uniform_(1, 2)
            state["exp_avg_sq"].uniform_(1, 2)
        torch.save(payload, dest)
    uri = upload(s3_env, copy, "ckpt")
    for tp in (1, 2, 4):
        for rank in range(tp):
            source, _ = sources.open_source_for_rank(uri, Target(tp), rank, cache, coalesce_gap=0)
            want = converted(open_checkpoint(copy), Target(tp), rank, tmp_path / "a")
            assert converted(source, Target(tp), rank, tmp_path / "b") == want
    originals = legacy_payloads(copy)
    for path, original in zip(source.files(), originals, strict=True):
        mirrored = torch.load(path, mmap=True, weights_only=False)
        moments = mirrored["optimizer"]["state"].values()
        assert all(not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in moments)
        for key, value in original["model"].items():
            if not isinstance(value, torch.Tensor):
                continue
            if original is not originals[0] and torch.equal(value, originals[0]["model"][key]):
                continue  # replicated tensors are read from the first shard only
            assert torch.equal(mirrored["model"][key], value), key


def test_metadata_only_open(megatron, s3_env, cache):
    for layout in (LEGACY_TP2, DIST_TP2):
        root = megatron("gpt").paths[layout]
        uri = upload(s3_env, root, layout.dirname)
        source = sources.open_source(uri, cache, coalesce_gap=0)
        local = open_checkpoint(root)
        assert (source.config, source.tp, source.pp) == (local.config, local.tp, local.pp)
        assert [estimate_rank(source, Target(2), r) for r in range(2)] == [
            estimate_rank(local, Target(2), r) for r in range(2)
        ]
        present = present_bytes(cache, uri + "/")
        assert 0 < present < 0.05 * object_bytes(root), layout
        weight = source.tensor("decoder.layers.0.mlp.linear_fc1.weight")
        if layout.format == "legacy":
            assert not weight.materialize().any()  # no weights there: holes read as zeros
        else:  # a chunk is a torch.save blob: a hole is refused, naming the object
            with pytest.raises(CorruptCheckpoint, match=r"not a torch\.save blob") as info:
                weight.materialize()
            assert info.value.path.startswith(f"{uri}/iter_0000010/__")


def test_default_gap_coalesces_requests(megatron, s3_env, tmp_path):
    root = megatron("llama").paths[LEGACY_TP2]
    uri = upload(s3_env, root, "ckpt")
    want = converted(open_checkpoint(root), Target(2), 1, tmp_path / "want")
    _, exact = sources.open_source_for_rank(uri, Target(2), 1, tmp_path / "a", coalesce_gap=0)
    source, merged = sources.open_source_for_rank(uri, Target(2), 1, tmp_path / "b")
    assert merged.ranges_fetched < exact.ranges_fetched / 10
    assert merged.bytes_fetched >= exact.bytes_fetched
    assert converted(source, Target(2), 1, tmp_path / "got") == want


def test_second_open_fetches_nothing(megatron, s3_env, cache):
    uri = upload(s3_env, megatron("llama").paths[DIST_TP2], "ckpt")
    _, first = sources.open_source_for_rank(uri, Target(2), 0, cache)
    _, again = sources.open_source_for_rank(uri, Target(2), 0, cache)
    assert first.bytes_fetched > 0 and first.ranges_fetched > 0
    assert again.bytes_fetched == 0 and again.ranges_fetched == 0
    assert again.bytes_cached >= first.bytes_fetched


def _scaled_copy(root: Path, dest: Path, factor: float) -> None:
    """A copy of a legacy checkpoint whose mp_rank_00 model weights are scaled by `factor`."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        out = dest / path.relative_to(root)
        out.parent.mkdir(parents=True, exist_ok=True)
        if "mp_rank_00" not in path.parts:
            out.write_bytes(path.read_bytes())
            continue
        payload = torch.load(path, weights_only=False)
        for key, value in payload["model"].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                payload["model"][key] = value * factor
        torch.save(payload, out)


def test_changed_object_is_fetched_again(megatron, s3_env, cache, tmp_path):
    root = megatron("llama").paths[LEGACY_TP2]
    uri = upload(s3_env, root, "ckpt")
    before = sources.source_identity(uri)
    source, _ = sources.open_source_for_rank(uri, Target(1), 0, cache)
    old = converted(source, Target(1), 0, tmp_path / "old")

    changed = tmp_path / "changed"
    _scaled_copy(root, changed, 2.0)
    key = "iter_0000010/mp_rank_00/model_optim_rng.pt"
    put(s3_env, f"ckpt/{key}", (changed / key).read_bytes())

    after = sources.source_identity(uri)
    assert after != before
    assert [e for e in after if e not in before] == [
        [key, (changed / key).stat().st_size, after[0][2]]
    ]
    source, stats = sources.open_source_for_rank(uri, Target(1), 0, cache)
    assert stats.bytes_fetched > 0
    new = converted(source, Target(1), 0, tmp_path / "new")
    assert new == converted(open_checkpoint(changed), Target(1), 0, tmp_path / "want") != old


def test_object_replaced_while_read(megatron, s3_env, cache, tmp_path, monkeypatch):
    """Bytes of a version that is no longer the listed one are refused and never recorded."""
    root = megatron("llama").paths[LEGACY_TP2]
    uri = upload(s3_env, root, "ckpt")
    changed = tmp_path / "changed"
    _scaled_copy(root, changed, 3.0)
    key = "iter_0000010/mp_rank_00/model_optim_rng.pt"
    real_locate = sources._locate

    def locate_then_replace(where: str):
        location = real_locate(where)
        put(s3_env, f"ckpt/{key}", (changed / key).read_bytes())
        return location

    monkeypatch.setattr(sources, "_locate", locate_then_replace)
    with pytest.raises(sparse.SourceChanged, match="changed") as info:
        sources.open_source_for_rank(uri, Target(1), 0, cache)
    assert info.value.path == f"{uri}/{key}"
    monkeypatch.setattr(sources, "_locate", real_locate)
    stale = [json.loads(r.read_text()) for r in cache.glob("objects/*/*/ranges.json")]
    assert not [r for r in stale if r["uri"].endswith(key) and r["ranges"]]
    source, _ = sources.open_source_for_rank(uri, Target(1), 0, cache)
    want = converted(open_checkpoint(changed), Target(1), 0, tmp_path / "want")
    assert converted(source, Target(1), 0, tmp_path / "got") == want


def test_identity(megatron, s3_env, tmp_path):
    root = megatron("llama").paths[DIST_TP2]
    uri = upload(s3_env, root, "ckpt")
    remote, local = sources.source_identity(uri), sources.source_identity(str(root))
    files = sorted(p.relative_to(root).as_posix() for p in (root / "iter_0000010").rglob("*"))
    assert [e[0] for e in remote] == [e[0] for e in local] == files
    assert [e[1] for e in remote] == [e[1] for e in local]
    md5 = hashlib.md5((root / files[0]).read_bytes()).hexdigest()  # moto: single-part ETag
    assert remote[0][2] == md5
    assert json.loads(json.dumps(remote)) == remote  # goes into job ids as JSON

    put(s3_env, f"ckpt/{files[0]}", (root / files[0]).read_bytes() + b" ")
    assert sources.source_identity(uri)[0][1:] != remote[0][1:]
    iter_uri = f"{uri}/iter_0000010"  # an iteration directory names its files from itself
    assert [e[0] for e in sources.source_identity(iter_uri)] == [f.split("/", 1)[1] for f in files]

    copy = tmp_path / "local"
    copy.mkdir()
    (copy / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    first = sources.source_identity(str(copy))
    assert [e[0] for e in first] == ["metadata.json"]
    os.utime(copy / "metadata.json", ns=(1, 1))
    assert sources.source_identity(str(copy)) != first


def test_missing_or_foreign_sources_name_the_uri(s3_env, cache):
    missing = f"s3://{s3_env}/nothing/here"
    for call in (sources.source_identity, sources.open_source):
        with pytest.raises(NotAMegatronCheckpoint, match="no objects") as info:
            call(missing)
        assert info.value.path == missing

    put(s3_env, "docs/readme.txt", b"hello")
    foreign = f"s3://{s3_env}/docs"
    with pytest.raises(NotAMegatronCheckpoint, match="not a Megatron checkpoint") as info:
        sources.open_source(foreign, cache)
    assert info.value.path == foreign

    put(s3_env, "dangling/latest_checkpointed_iteration.txt", b"20\n")
    with pytest.raises(NotAMegatronCheckpoint, match="iter_0000020") as info:
        sources.source_identity(f"s3://{s3_env}/dangling")
    assert info.value.path == f"s3://{s3_env}/dangling/latest_checkpointed_iteration.txt"

    with pytest.raises(NotAMegatronCheckpoint) as info:
        sources.source_identity(str(cache / "absent"))
    assert info.value.path == str(cache / "absent")

    bucket = "s3://no-such-bucket-porter/x"
    with pytest.raises(ConversionError) as info:
        sources.source_identity(bucket)
    assert info.value.path == bucket and "bucket does not exist" in str(info.value)


def test_corrupt_object_names_its_uri(megatron, s3_env, cache, tmp_path):
    root = megatron("llama").paths[LEGACY_TP2]
    uri = upload(s3_env, root, "ckpt")
    key = "iter_0000010/mp_rank_01/model_optim_rng.pt"
    put(s3_env, f"ckpt/{key}", random.Random(0).randbytes(4096))
    with pytest.raises(CorruptCheckpoint) as info:
        sources.open_source_for_rank(uri, Target(2), 0, cache)
    assert info.value.path == f"{uri}/{key}"
    assert str(cache) not in str(info.value)

    # A sound zip whose pickle is garbage: found by the reader, reported with the s3:// URI.
    good = bytearray((root / key).read_bytes())
    pickle = check_torch_zip(root / key, root / key)["model_optim_rng/data.pkl"]
    start, length = pickle.offset, pickle.nbytes
    good[start : start + length] = random.Random(1).randbytes(length)
    put(s3_env, f"ckpt/{key}", bytes(good))
    with pytest.raises(CorruptCheckpoint) as info:
        sources.open_source_for_rank(uri, Target(2), 1, cache)
    assert info.value.path == f"{uri}/{key}"
    assert str(cache) not in str(info.value)


_WORKER = """
import hashlib, sys
from pathlib import Path
from converters.trtllm.convert import convert_rank
from converters.trtllm.plan import Target
from tasks.storage import sources
uri, cache, out, tp = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
for rank in map(int, sys.argv[5:]):
    source, _ = sources.open_source_for_rank(uri, Target(tp), rank, cache, coalesce_gap=0)
    convert_rank(source, Target(tp), rank, out / f"rank{rank}.safetensors")
"""


def test_processes_fill_one_mirror_concurrently(megatron, s3_env, cache, tmp_path):
    root = megatron("llama").paths[LEGACY_PP2]
    uri = upload(s3_env, root, "ckpt")
    orders = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]]
    procs, outs = [], []
    for i, order in enumerate(orders):
        out = tmp_path / f"out{i}"
        out.mkdir()
        outs.append(out)
        argv = [sys.executable, "-c", _WORKER, uri, str(cache), str(out), "4", *map(str, order)]
        procs.append(subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    local = open_checkpoint(root)
    for rank in range(4):
        want = converted(local, Target(4), rank, tmp_path / "want")
        for out in outs:
            got = hashlib.sha256((out / f"rank{rank}.safetensors").read_bytes()).hexdigest()
            assert got == want, (out, rank)
    records = list(cache.glob("objects/*/*/ranges.json"))
    assert len(records) == 2  # one per object, however many processes filled it


def test_range_arithmetic():
    rng = random.Random(1)
    for _ in range(300):
        a = [(s, s + rng.randint(0, 20)) for s in (rng.randint(0, 200) for _ in range(6))]
        b = [(s, s + rng.randint(0, 20)) for s in (rng.randint(0, 200) for _ in range(6))]
        bytes_a = {i for s, e in a for i in range(s, e)}
        bytes_b = {i for s, e in b for i in range(s, e)}
        merged = ranges.merge(a)
        assert {i for s, e in merged for i in range(s, e)} == bytes_a
        assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(merged))
        missing = ranges.subtract(merged, ranges.merge(b))
        assert {i for s, e in missing for i in range(s, e)} == bytes_a - bytes_b
        gap = rng.randint(0, 10)
        joined = ranges.coalesce(merged, gap)
        assert all(s2 - e1 >= gap for (_, e1), (s2, _) in itertools.pairwise(joined))
        assert bytes_a <= {i for s, e in joined for i in range(s, e)}
        pieces = ranges.split(joined, 7)
        assert all(e - s <= 7 for s, e in pieces) and ranges.merge(pieces) == ranges.merge(joined)
