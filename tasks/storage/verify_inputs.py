"""The two inputs of a verification as local files: SOURCE (a Megatron checkpoint, local or
s3://, whose bytes are fetched into the sparse source cache first) and EXPORT (a directory, or
an s3:// prefix copied into a scratch directory: the readers map local files)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from converters.megatron.layout import SourceCheckpoint
from tasks.storage import sources
from tasks.storage.store import open_store

# What a verification reads of an export; nothing else is copied from s3://.
_EXPORT_FILES = ("config.json", "manifest.json", "model.safetensors.index.json")


def open_verify_source(
    uri: str, expected_digest: str | None = None, architecture: str | None = None
) -> SourceCheckpoint:
    """The Megatron checkpoint at `uri`, with every tensor a verification reads present locally
    (`architecture`: what the args cannot say, converters/megatron/declare.py)."""
    from converters.verify.source import source_reads

    source, _ = sources.open_source_for(
        uri, source_reads, expected_digest=expected_digest, architecture=architecture
    )
    return source


@contextlib.contextmanager
def local_export(uri: str) -> Iterator[Path]:
    """The export at `uri` as a local directory (an s3:// prefix copied for the duration)."""
    if not uri.startswith("s3://"):
        yield Path(uri)
        return
    store = open_store(uri)
    with tempfile.TemporaryDirectory(prefix="porter-verify-") as tmp:
        for key in store.list():
            if "/" not in key and (key in _EXPORT_FILES or key.endswith(".safetensors")):
                store.get_file(key, Path(tmp) / key)
        yield Path(tmp)
