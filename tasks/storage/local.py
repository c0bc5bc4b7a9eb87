"""The artifact store over a local directory: files under a root, written atomically, with
sha256 sidecars under ``.porter-meta/``."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.storage.base import (
    RESERVED,
    Artifact,
    ArtifactError,
    CorruptArtifact,
    atomic_target,
    check_key,
    check_range,
    hash_copy,
    space_errors,
    verify_sha256,
)

_META_DIR = ".porter-meta"


class LocalStore:
    """Artifacts as files under `root`. Writes are atomic (temp file + rename).

    The ETag of a file is derived from its inode, size and mtime (every write is a rename of a
    new file, so each write gets a new ETag). The sha256 recorded by `put_file` lives in
    ``root/.porter-meta/<key>.json`` and is trusted only while the file's ETag is unchanged.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()

    def uri(self, key: str = "") -> str:
        return str(self._path(key)) if key else str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _meta_path(self, key: str) -> Path:
        return self.root / _META_DIR / f"{key}.json"

    @staticmethod
    def _etag(st: os.stat_result) -> str:
        return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"

    def put_file(
        self,
        local: Path,
        key: str,
        *,
        sha256: str | None = None,
        tag: str | None = None,
        move: bool = False,
    ) -> Artifact:
        with space_errors(self.uri(key), f"{key} in {self.root}"):
            return self._put_file(local, key, sha256=sha256, tag=tag, move=move)

    def _put_file(
        self, local: Path, key: str, *, sha256: str | None, tag: str | None, move: bool
    ) -> Artifact:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move and sha256 is not None and os.stat(local).st_dev == os.stat(dest.parent).st_dev:
            with open(local, "rb+") as f:
                os.fsync(f.fileno())
            etag = self._etag(os.stat(local))  # rename keeps inode, size and mtime
            self._write_meta(key, sha256, os.stat(local).st_size, etag, tag)
            os.replace(local, dest)
            return Artifact(key, os.stat(dest).st_size, sha256, etag, tag)
        with open(local, "rb") as src, atomic_target(dest) as tmp:
            with open(tmp, "wb") as dst:
                sha, size = hash_copy(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
            if sha256 is not None and sha256 != sha:
                raise CorruptArtifact(
                    f"{local} hashes to {sha}, not the given {sha256}", self.uri(key)
                )
            etag = self._etag(os.stat(tmp))
            self._write_meta(key, sha, size, etag, tag)
        if move:
            Path(local).unlink(missing_ok=True)
        return Artifact(key, size, sha, etag, tag)

    def _write_meta(self, key: str, sha: str, size: int, etag: str, tag: str | None) -> None:
        with atomic_target(self._meta_path(key)) as mtmp:
            mtmp.write_text(json.dumps({"sha256": sha, "bytes": size, "etag": etag, "tag": tag}))

    @contextlib.contextmanager
    def scratch(self, key: str) -> Iterator[Path]:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        path = dest.parent / f"{RESERVED}tmp-{uuid.uuid4().hex}-{dest.name}"
        try:
            with space_errors(self.uri(key), f"the scratch file {path}"):
                yield path
        finally:
            path.unlink(missing_ok=True)

    def stat(self, key: str) -> Artifact | None:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            return None
        etag, sha, tag = self._etag(st), None, None
        with contextlib.suppress(FileNotFoundError, ValueError):
            meta = json.loads(self._meta_path(key).read_text())
            if meta.get("etag") == etag:
                sha, tag = meta.get("sha256"), meta.get("tag")
        return Artifact(key, st.st_size, sha, etag, tag)

    def _require(self, key: str) -> Artifact:
        art = self.stat(key)
        if art is None:
            raise ArtifactError("no such artifact", self.uri(key))
        return art

    def get_file(self, key: str, local: Path) -> Artifact:
        art = self._require(key)
        copy = space_errors(self.uri(key), f"the local copy {local}")
        with copy, open(self._path(key), "rb") as src, atomic_target(Path(local)) as tmp:
            with open(tmp, "wb") as dst:
                sha, _ = hash_copy(src, dst)
            verify_sha256(self.uri(key), art.sha256, sha)
        return art

    def read_range(self, key: str, start: int, length: int) -> bytes:
        check_range(start, length)
        self._require(key)
        with open(self._path(key), "rb") as f:
            f.seek(start)
            return f.read(length)

    def list(self, prefix: str = "") -> list[str]:
        check_key(prefix, prefix=True)
        # Walk only the deepest folder that can hold matches.
        base = self.root / prefix.rpartition("/")[0]
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED)]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(RESERVED) and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def put_json_if_absent(self, key: str, data: dict[str, Any]) -> bool:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f"{RESERVED}tmp-{uuid.uuid4().hex}-{dest.name}"
        try:
            with space_errors(self.uri(key), str(tmp)), open(tmp, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, dest)  # atomic: fails if dest exists, never shows a partial file
            except FileExistsError:
                return False
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def get_json(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(key).read_bytes())
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        for path in (self._path(key), self._meta_path(key)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._prune(key)

    def seal(self, keys: list[str]) -> None:
        for key in keys:
            self._meta_path(key).unlink(missing_ok=True)
            self._prune(key)

    def _prune(self, key: str) -> None:
        """Remove the folders of `key` (data and sidecar) that are left empty, up to the root."""
        for top in (self.root, self.root / _META_DIR):
            folder = (top / key).parent
            while folder != self.root and folder.is_relative_to(self.root):
                try:
                    folder.rmdir()
                except OSError:
                    break
                folder = folder.parent

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            for path in (self._path(key), self._meta_path(key)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for top in (self.root, self.root / _META_DIR):  # prune folders left empty
            base = top / prefix.rpartition("/")[0]
            for dirpath, _, _ in sorted(os.walk(base), key=lambda w: -len(w[0])):
                if Path(dirpath) != top:
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)
        self._prune(prefix.rstrip("/"))  # and the folders above it, once empty
