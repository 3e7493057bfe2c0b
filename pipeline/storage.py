"""Object storage for job inputs and outputs, through fsspec: a local folder by default.

An output prefix holds
    images/<id>.png            one PNG per finished image (deterministic key: rewrites overwrite)
    metadata/part-<d>.parquet  ImageRecord rows; one fragment per written batch
    errors/part-<d>.parquet    ErrorRecord rows
    runs/<utc>.json            one summary per job run
where <d> is a digest of the fragment's content ids, so a retried batch rewrites the
same object instead of adding a duplicate. Writes are atomic: a local file is written
aside and renamed into place; object stores publish whole objects on PUT. Readers skip
names starting with '.' or '_', which is where partial local writes live.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import uuid
from functools import cached_property
from typing import Any

IMAGES, METADATA, ERRORS, RUNS = "images", "metadata", "errors", "runs"


class Storage:
    """A prefix in a filesystem (local path, file://, or any fsspec URL) and atomic writes under it."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = uri.rstrip("/") or uri
        self.storage_options = storage_options or {}

    def __reduce__(self):  # ship the address, not the live filesystem, to Ray workers
        return (Storage, (self.uri, self.storage_options))

    @cached_property
    def _fs_root(self) -> tuple[Any, str]:
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        return fs, root.rstrip("/")

    @property
    def fs(self) -> Any:
        return self._fs_root[0]

    @property
    def root(self) -> str:
        return self._fs_root[1]

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def path(self, key: str) -> str:
        """The filesystem path of a key under this prefix."""
        return posixpath.join(self.root, key) if key else self.root

    def url(self, key: str) -> str:
        """The full URI of a key (what metadata records as `uri`)."""
        path = self.path(key)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def write_bytes(self, key: str, data: bytes) -> str:
        """Write `data` at `key` atomically; return its URI."""
        path = self.path(key)
        if self.is_local:
            parent, name = posixpath.split(path)
            self.fs.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)  # a rename within one folder: atomic
        else:
            self.fs.pipe_file(path, data)
        return self.url(key)

    def write_table(self, key: str, table: Any) -> str:
        """Write an Arrow table as one Parquet object at `key`, atomically."""
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return self.write_bytes(key, buf.getvalue())

    def read_table(self, prefix: str, columns: list[str] | None = None) -> Any:
        """All Parquet fragments under `prefix` as one Arrow table, or None when there are none."""
        import pyarrow.dataset as pads

        path = self.path(prefix)
        if not self.fs.exists(path):
            return None
        dataset = pads.dataset(
            path, format="parquet", filesystem=self.fs, ignore_prefixes=[".", "_"]
        )
        if not dataset.files:
            return None
        return dataset.to_table(columns=columns)

    def read_ids(self, prefix: str = METADATA) -> set[str]:
        """Ids recorded under `prefix` (finished images for `metadata`)."""
        table = self.read_table(prefix, columns=["id"])
        return set() if table is None else set(table.column("id").to_pylist())


def fragment_key(prefix: str, ids: list[str]) -> str:
    """A deterministic fragment name for a batch: the same ids always give the same key."""
    digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:24]
    return f"{prefix}/part-{digest}.parquet"


def image_key(image_id: str) -> str:
    return f"{IMAGES}/{image_id}.png"


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
