"""The artifact store: the same behaviour over a local directory and S3 (moto's server over HTTP)."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tasks.storage.base import ArtifactError, CorruptArtifact, InvalidKey, MiB
from tasks.storage.cache import CachedFetcher
from tasks.storage.local import LocalStore
from tasks.storage.s3 import S3Store, default_transfer_config
from tasks.storage.store import open_store

PART = 5 * MiB  # S3's smallest part size


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    """A LocalStore, or an S3Store under a prefix of a fresh bucket with 5 MiB parts."""
    if request.param == "local":
        return open_store(tmp_path / "store")
    bucket = request.getfixturevalue("s3_env")
    return open_store(
        f"s3://{bucket}/jobs/j1",
        transfer_config=default_transfer_config(part_size=PART, threads=4),
    )


@pytest.fixture
def gets(store, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts store.get_file calls and, for S3, GetObject requests sent over HTTP."""
    counts = {"get_file": 0, "GetObject": 0}
    real = store.get_file

    def counting_get_file(key, local):
        counts["get_file"] += 1
        return real(key, local)

    monkeypatch.setattr(store, "get_file", counting_get_file)
    if isinstance(store, S3Store):

        def on_get(**_):
            counts["GetObject"] += 1

        store.client.meta.events.register("before-call.s3.GetObject", on_get)
    return counts


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tamper(store, key: str, data: bytes) -> None:
    """Replace the object's bytes but keep the sha256 recorded for the old bytes."""
    if isinstance(store, S3Store):
        old = store.stat(key)
        store.client.put_object(
            Bucket=store.bucket, Key=store._name(key), Body=data, Metadata={"sha256": old.sha256}
        )
    else:  # bit rot: same file, same size, same mtime
        path = store.root / key
        st = path.stat()
        with open(path, "r+b") as f:
            f.write(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_put_get_round_trip(store, tmp_path: Path) -> None:
    data = b"hello porter\n" * 1000
    art = store.put_file(write(tmp_path / "src", data), "a/b/w.bin")
    assert (art.key, art.bytes, art.sha256) == ("a/b/w.bin", len(data), sha(data))
    assert art.etag
    assert store.stat("a/b/w.bin") == art
    got = store.get_file("a/b/w.bin", tmp_path / "out" / "w.bin")
    assert got == art
    assert (tmp_path / "out" / "w.bin").read_bytes() == data
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["w.bin"]  # no temp file left


def test_multipart_upload_round_trips_and_records_sha256(store, tmp_path: Path) -> None:
    data = os.urandom(12 * MiB + 123)
    art = store.put_file(write(tmp_path / "big", data), "rank0.safetensors")
    assert art.sha256 == sha(data) and art.bytes == len(data)
    if isinstance(store, S3Store):
        assert art.etag.endswith("-3"), art.etag  # three parts of 5 MiB
    store.get_file("rank0.safetensors", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data


def test_read_range_returns_exactly_the_bytes(store, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    store.put_file(write(tmp_path / "src", data), "x.pt")
    for start, length in [(0, 1), (0, 10), (100, 1000), (len(data) - 5, 5), (7, len(data) - 7)]:
        assert store.read_range("x.pt", start, length) == data[start : start + length]
    assert store.read_range("x.pt", len(data) - 5, 100) == data[-5:]  # short at the end
    assert store.read_range("x.pt", len(data), 10) == b""
    assert store.read_range("x.pt", 3, 0) == b""
    with pytest.raises(ValueError):
        store.read_range("x.pt", -1, 3)
    with pytest.raises(ArtifactError, match=r"missing\.pt"):
        store.read_range("missing.pt", 0, 3)


def test_put_json_if_absent_creates_once(store) -> None:
    assert store.get_json("manifest.json") is None
    assert store.put_json_if_absent("manifest.json", {"job": 1}) is True
    assert store.put_json_if_absent("manifest.json", {"job": 2}) is False
    assert store.get_json("manifest.json") == {"job": 1}


def test_put_json_if_absent_concurrent_has_one_winner(store) -> None:
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: store.put_json_if_absent("c/m.json", {"i": i}), range(8)))
    assert won.count(True) == 1
    assert store.get_json("c/m.json") == {"i": won.index(True)}


def test_missing_key(store, tmp_path: Path) -> None:
    assert store.stat("nope.bin") is None
    with pytest.raises(ArtifactError, match=r"nope\.bin") as info:
        store.get_file("nope.bin", tmp_path / "out")
    assert store.uri("nope.bin") in str(info.value)
    assert not (tmp_path / "out").exists()


def test_list_and_delete_prefix(store, tmp_path: Path) -> None:
    src = write(tmp_path / "src", b"x")
    keys = ["a/1", "a/2", "a/b/3", "ab/4", "c"]
    for key in keys:
        store.put_file(src, key)
    assert store.list("") == keys
    assert store.list("a/") == ["a/1", "a/2", "a/b/3"]
    assert store.list("a") == ["a/1", "a/2", "a/b/3", "ab/4"]
    assert store.list("zzz/") == []
    store.delete_prefix("a/")
    assert store.list("") == ["ab/4", "c"]
    assert store.stat("a/1") is None
    store.delete_prefix("")
    assert store.list("") == []


BAD_KEYS = ["../x", "a/../../x", "/etc/passwd", "a\x00b", "", "a//b", "./a", ".porter-meta/x"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_traversal_keys_rejected(store, key: str, tmp_path: Path) -> None:
    src = write(tmp_path / "src", b"x")
    calls = [
        lambda: store.put_file(src, key),
        lambda: store.get_file(key, tmp_path / "out"),
        lambda: store.stat(key),
        lambda: store.read_range(key, 0, 1),
        lambda: store.put_json_if_absent(key, {}),
        lambda: store.get_json(key),
    ]
    for call in calls:
        with pytest.raises(InvalidKey, match="artifact key") as info:
            call()
        assert isinstance(info.value, ValueError) and repr(key) in str(info.value)
    if key:  # "" is a valid prefix (everything)
        for call in (lambda: store.list(key), lambda: store.delete_prefix(key)):
            with pytest.raises(InvalidKey, match="artifact prefix"):
                call()
    assert not (tmp_path.parent / "x").exists()


def test_cached_fetcher_reads_once_and_refetches_changed_object(
    store, gets: dict[str, int], tmp_path: Path
) -> None:
    fetcher = CachedFetcher(tmp_path / "cache")
    store.put_file(write(tmp_path / "v1", b"version one"), "src/model.pt")

    first = fetcher.fetch(store, "src/model.pt")
    assert first.read_bytes() == b"version one" and first.name == "model.pt"
    assert gets["get_file"] == 1
    mtime = first.stat().st_mtime_ns
    gets_after_first = gets["GetObject"]

    again = fetcher.fetch(store, "src/model.pt")
    assert again == first and again.stat().st_mtime_ns == mtime
    assert gets["get_file"] == 1 and gets["GetObject"] == gets_after_first  # nothing read

    store.put_file(write(tmp_path / "v2", b"version two!"), "src/model.pt")
    changed = fetcher.fetch(store, "src/model.pt")
    assert changed.read_bytes() == b"version two!"
    assert gets["get_file"] == 2
    assert not first.exists()  # the old version was dropped from the cache
    if isinstance(store, S3Store):
        assert gets["GetObject"] > gets_after_first


def test_corrupted_object_is_detected(store, tmp_path: Path) -> None:
    store.put_file(write(tmp_path / "src", b"good bytes"), "w.bin")
    tamper(store, "w.bin", b"evil bytes")
    with pytest.raises(CorruptArtifact, match="sha256 mismatch") as info:
        store.get_file("w.bin", tmp_path / "out")
    assert store.uri("w.bin") in str(info.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CorruptArtifact):
        CachedFetcher(tmp_path / "cache").fetch(store, "w.bin")


def test_tampered_cache_file_is_fetched_again_when_verifying(
    store, gets: dict[str, int], tmp_path: Path
) -> None:
    fetcher = CachedFetcher(tmp_path / "cache")
    store.put_file(write(tmp_path / "src", b"good bytes"), "w.bin")
    path = fetcher.fetch(store, "w.bin")
    path.write_bytes(b"evil bytes")
    assert fetcher.fetch(store, "w.bin").read_bytes() == b"evil bytes"  # cheap check: size only
    assert gets["get_file"] == 1
    assert fetcher.fetch(store, "w.bin", verify=True).read_bytes() == b"good bytes"
    assert gets["get_file"] == 2


def test_local_writes_leave_only_the_artifacts(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put_file(write(tmp_path / "src", b"x"), "d/f")
    store.put_json_if_absent("d/m.json", {})
    assert sorted(p.name for p in (tmp_path / "s" / "d").iterdir()) == ["f", "m.json"]
    assert store.list("") == ["d/f", "d/m.json"]


def test_local_file_changed_outside_the_store_has_no_sha256(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    art = store.put_file(write(tmp_path / "src", b"x"), "f")
    write(tmp_path / "s" / "f", b"yy")
    now = store.stat("f")
    assert now.etag != art.etag and now.sha256 is None and now.bytes == 2


def test_open_store_dispatch(tmp_path: Path, s3_env: str) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    s3 = open_store(f"s3://{s3_env}/p/q/")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == (s3_env, "p/q")
    assert s3.uri("k") == f"s3://{s3_env}/p/q/k"
    with pytest.raises(ArtifactError, match="bucket"):
        open_store("s3:///x")


def test_s3_missing_bucket_is_one_clear_error(s3_env: str, tmp_path: Path) -> None:
    store = open_store("s3://porter-no-such-bucket/jobs")
    src = write(tmp_path / "src", b"x")
    for call in (
        lambda: store.put_file(src, "k"),
        lambda: store.stat("k"),  # HEAD's 404 must not read as "absent"
        lambda: store.get_json("k"),
        lambda: store.list(""),
        lambda: store.put_json_if_absent("k", {}),
    ):
        with pytest.raises(ArtifactError, match="bucket does not exist") as info:
            call()
        assert "s3://porter-no-such-bucket/jobs" in str(info.value)


def test_s3_put_json_if_absent_uses_if_none_match(s3_env: str) -> None:
    """moto 5.2 answers IfNoneMatch='*' with 412, as S3 does: the commit is not head-then-put."""
    store = open_store(f"s3://{s3_env}")
    sent: list[dict] = []
    store.client.meta.events.register(
        "before-parameter-build.s3.PutObject", lambda params, **_: sent.append(dict(params))
    )
    assert store.put_json_if_absent("m.json", {"a": 1}) is True
    assert store.put_json_if_absent("m.json", {"a": 2}) is False
    assert [p.get("IfNoneMatch") for p in sent] == ["*", "*"]
