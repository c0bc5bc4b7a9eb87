"""Source checkpoints from a local path or ``s3://bucket/prefix``, reading only what is needed.

A local source is opened in place. An s3:// source is read through a *sparse mirror*
(`tasks.storage.mirror`): a local directory shaped like the checkpoint's iteration directory, in
which every file is a sparse file of its object's full size holding only the byte ranges fetched
so far, which the ordinary readers (`open_checkpoint`) open unchanged.

- `open_source` fetches metadata only: whole small metadata files (`metadata.json`, `common.pt`,
  `.metadata`) and, of each legacy rank file (a torch.save zip), the central directory, the
  30-byte local headers and the non-storage records (`data.pkl`, version tags). No weights.
- `open_source_for_rank` then asks the rank's plan which byte ranges its lazy tensors read
  (`LazyTensor.file_ranges`) and fetches exactly those, so a rank downloads its share of the
  weights and never the optimizer state. Holes read as zeros, so this must cover every read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from config.settings import Settings
from converters.errors import NotAMegatronCheckpoint
from converters.megatron.layout import (
    LATEST_FILE,
    SourceCheckpoint,
    detect_format,
    iteration_dir_name,
    open_checkpoint,
    resolve_iteration_dir,
)
from tasks.jobs import locations
from tasks.jobs.ids import identity_digest
from tasks.storage.base import ArtifactStore
from tasks.storage.sparse import FetchStats, Location, SourceChanged, SourceObject, read_exactly
from tasks.storage.store import open_store

if TYPE_CHECKING:  # listing a source (its identity) needs no numpy; the readers below import it
    from converters.tensors import LazyTensor
    from converters.trtllm.plan import Target

# --------------------------------------------------------------------------------------------
# Public interface


def source_identity(uri: str) -> list[list]:
    """[[relative name, size, version]] of every file of the checkpoint's iteration (names relative
    to `uri`; version = ETag for s3://, mtime_ns for local), sorted by name."""
    if _is_s3(uri):
        location = _locate(uri)
        return [[o.key, o.size, o.etag] for o in location.objects]
    root = Path(uri)
    tracker = root / LATEST_FILE
    locations.check_tree(root, tracker, walk=False)
    iter_dir = resolve_iteration_dir(root)
    locations.check_tree(iter_dir)  # (a symlinked iteration directory: its target and contents)
    detect_format(iter_dir)
    identity = []
    for path in sorted(p for p in iter_dir.rglob("*") if p.is_file()):
        st = path.stat()
        identity.append([path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return identity


def open_source(
    uri: str,
    cache_dir: Path | None = None,
    *,
    coalesce_gap: int | None = None,
    architecture: str | None = None,
) -> SourceCheckpoint:
    """Local path → `open_checkpoint(path)`. s3:// → a sparse mirror under `cache_dir` holding
    only metadata bytes (enough for config, shapes and estimates); no weights are downloaded."""
    from tasks.storage.mirror import Mirror

    if not _is_s3(uri):
        return open_checkpoint(Path(uri), architecture)
    mirror = Mirror(_locate(uri), _cache_root(cache_dir), _gap(coalesce_gap))
    mirror.fetch_metadata(FetchStats())
    return mirror.open(architecture)


def open_source_for_rank(
    uri: str,
    target: Target,
    rank: int,
    cache_dir: Path | None = None,
    *,
    coalesce_gap: int | None = None,
    expected_digest: str | None = None,
    architecture: str | None = None,
) -> tuple[SourceCheckpoint, FetchStats]:
    """`open_source_for` the tensors of TensorRT-LLM rank `rank` of `target`."""
    from converters.trtllm.plan import rank_tensors

    return open_source_for(
        uri,
        lambda source: [t.source for t in rank_tensors(source, target, rank)],
        cache_dir,
        coalesce_gap=coalesce_gap,
        expected_digest=expected_digest,
        architecture=architecture,
    )


def open_source_for(
    uri: str,
    reads: Callable[[SourceCheckpoint], list[LazyTensor]],
    cache_dir: Path | None = None,
    *,
    coalesce_gap: int | None = None,
    expected_digest: str | None = None,
    architecture: str | None = None,
) -> tuple[SourceCheckpoint, FetchStats]:
    """Like `open_source`, then fetch every byte range the lazy tensors `reads(source)` read (a
    rank's or a shard's plan). Returns the checkpoint and what this call fetched (local paths:
    zeros). With `expected_digest` (the `identity_digest` the job was planned with), a source that
    changed since then raises SourceChanged instead of being converted under the old plan."""
    if not _is_s3(uri):
        if expected_digest is not None:
            _check_digest(uri, source_identity(uri), expected_digest)
        return open_checkpoint(Path(uri), architecture), FetchStats()
    stats = FetchStats()
    location = _locate(uri)
    if expected_digest is not None:
        _check_digest(uri, [[o.key, o.size, o.etag] for o in location.objects], expected_digest)
    from tasks.storage.mirror import Mirror

    mirror = Mirror(location, _cache_root(cache_dir), _gap(coalesce_gap))
    mirror.fetch_metadata(stats)
    planned = mirror.open(architecture)
    with mirror.naming():
        ranges = [r for tensor in reads(planned) for r in tensor.file_ranges()]
    mirror.fetch(ranges, stats)
    return mirror.open(architecture), stats  # mapped afresh, after the bytes arrived


# --------------------------------------------------------------------------------------------
# Finding the iteration in a store


def _is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def _check_digest(uri: str, identity: list, expected: str) -> None:
    if identity_digest(identity) != expected:
        raise SourceChanged(
            "the checkpoint changed since the job was planned (files added, removed or "
            "rewritten); retry the job to convert the new version",
            uri,
        )


def _gap(coalesce_gap: int | None) -> int:
    return Settings.from_env().fetch_coalesce_bytes if coalesce_gap is None else coalesce_gap


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).absolute()
    configured = Settings.from_env().cache_dir
    return Path(configured).absolute() if configured else Path.home() / ".cache/porter/sources"


def _iteration_prefix(store: ArtifactStore) -> str:
    """ "" when the store's prefix is an iteration directory, else the one the tracker names."""
    tracker = store.stat(LATEST_FILE)
    if tracker is None:
        return ""

    def unchanged() -> None:
        now = store.stat(LATEST_FILE)
        if now is None or now.etag != tracker.etag:
            raise SourceChanged("changed while it was being read; retry", store.uri(LATEST_FILE))

    data = read_exactly(store, LATEST_FILE, 0, min(tracker.bytes, 64), unchanged)
    return iteration_dir_name(data.decode("ascii", "replace"), store.uri(LATEST_FILE)) + "/"


def latest_iteration(root: str) -> tuple[str, str]:
    """(location of the iteration, its label) that `latest_checkpointed_iteration.txt` under the
    training output `root` names: ("s3://b/run/iter_0000300", "300"), or ".../release" and
    "release". A root without the tracker is NotAMegatronCheckpoint naming it. A root outside
    the sources allow-list is refused before anything is read there."""
    locations.check_source(root, "checkpoint")
    if _is_s3(root):
        store = open_store(root)
        if store.stat(LATEST_FILE) is None:
            raise NotAMegatronCheckpoint(f"no {LATEST_FILE} under this training output", root)
        name = _iteration_prefix(store).rstrip("/")
        location = store.uri(name)
    else:
        if not (Path(root) / LATEST_FILE).is_file():
            raise NotAMegatronCheckpoint(f"no {LATEST_FILE} under this training output", root)
        iter_dir = resolve_iteration_dir(Path(root))
        name, location = iter_dir.name, str(iter_dir)
    return location, "release" if name == "release" else str(int(name[len("iter_") :]))


def _locate(uri: str) -> Location:
    """The iteration of an s3:// checkpoint and its objects (sizes and ETags); errors name `uri`."""
    store = open_store(uri)
    prefix = _iteration_prefix(store)
    keys = [
        k
        for k in store.list(prefix)
        if not k.endswith("/") and not (prefix == "" and k == LATEST_FILE)  # no folder markers
    ]
    if not keys:
        if prefix:
            raise NotAMegatronCheckpoint(
                f"points at {prefix}, which holds no objects", store.uri(LATEST_FILE)
            )
        raise NotAMegatronCheckpoint("no such checkpoint: no objects under this prefix", uri)
    relative = [k[len(prefix) :] for k in keys]
    if "metadata.json" not in relative and not any(r.startswith("mp_rank_") for r in relative):
        raise NotAMegatronCheckpoint(
            f"not a Megatron checkpoint: no {LATEST_FILE}, metadata.json or mp_rank_* folders",
            store.uri(prefix.rstrip("/")) if prefix else uri,
        )
    objects = []
    for key, rel in zip(keys, relative, strict=True):
        art = store.stat(key)
        if art is None:
            raise SourceChanged(
                "object disappeared while the checkpoint was listed", store.uri(key)
            )
        objects.append(SourceObject(key, rel, art.bytes, art.etag))
    return Location(store, prefix, tuple(objects))
