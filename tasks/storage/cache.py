"""A local cache of artifact store objects, keyed by ETag (`CachedFetcher`)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from tasks.storage.base import Artifact, ArtifactError, ArtifactStore, sha256_file

log = logging.getLogger(__name__)


class CachedFetcher:
    """A local cache of store objects keyed by ETag.

    `fetch` asks the store for the object's ETag (a HEAD, no body) and downloads only when this
    ETag is not cached yet; older versions of the same key are removed. With ``verify=True`` a
    cache hit is re-hashed against the recorded sha256 and re-downloaded if it was tampered with.
    """

    def __init__(self, cache_dir: Path | str) -> None:
        self.cache_dir = Path(cache_dir)

    def _slot(self, store: ArtifactStore, key: str) -> Path:
        return self.cache_dir / hashlib.sha256(store.uri(key).encode()).hexdigest()[:32]

    def fetch(self, store: ArtifactStore, key: str, *, verify: bool = False) -> Path:
        art = store.stat(key)
        if art is None:
            raise ArtifactError("no such artifact", store.uri(key))
        slot = self._slot(store, key)
        version = hashlib.sha256(art.etag.encode()).hexdigest()[:32]
        path = slot / version / key.rsplit("/", 1)[-1]
        if path.is_file() and self._intact(path, art, verify):
            return path
        got = store.get_file(key, path)
        if got.etag != art.etag:  # replaced in between: file it under the version we got
            newer = slot / hashlib.sha256(got.etag.encode()).hexdigest()[:32] / path.name
            newer.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, newer)
            path, version = newer, newer.parent.name
        for old in slot.iterdir():
            if old.name != version:
                shutil.rmtree(old, ignore_errors=True)
        return path

    @staticmethod
    def _intact(path: Path, art: Artifact, verify: bool) -> bool:
        if path.stat().st_size != art.bytes:
            log.warning("cached %s has the wrong size; fetching it again", path)
            return False
        if verify and art.sha256 is not None and sha256_file(path) != art.sha256:
            log.warning("cached %s does not match its sha256; fetching it again", path)
            return False
        return True
