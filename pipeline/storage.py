"""Object storage for job inputs and outputs, through fsspec: a local folder by default.

An output prefix holds
    images/<id>.png                    one file per finished image (deterministic key;
                                       key_prefix hashed: images/<hh>/<id>.png; .webp or
                                       .jpg with encoding.format)
    variants/<name>/<id>.png           encoding.variants: resized files per image
    rejected/<id>.png                  quality.keep_rejected: the images the gate refused
    shards/<digest>.tar                output_format webdataset: a write batch's images
                                       and JSON per image, named by content
    metadata/part-<run>-<d>.parquet    ImageRecord rows; one fragment per written batch
    errors/part-<run>-<d>.parquet      ErrorRecord rows
    runs/<run>.json                    one record per job run
    _daguerre, _lease.json             the marker of an output, the lease of the run writing it
where <run> is the run id and <d> a digest of the fragment's ids, so a retried batch
rewrites the same object. Which row of an id counts is decided by its readers
(pipeline/catalog.py), not by fragment names. Writes are atomic: a local file is written
aside and renamed into place; object stores publish whole objects on PUT. Readers skip
names starting with '.' or '_', which is where partial local writes and leases live.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import posixpath
import uuid
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import StorageConfig

IMAGES, METADATA, ERRORS, RUNS = "images", "metadata", "errors", "runs"
SHARDS = "shards"  # output_format webdataset: shards/<content digest>.tar
REJECTED = "rejected"  # quality.keep_rejected: rejected/<id>.png
READ_RELISTS = 5  # a reader racing compaction lists again at most this often
MARKER = "_daguerre"  # written at the output root when a job starts: proves write access


class StorageError(ValueError):
    """Storage that cannot be used; one line naming the URI and the cause, never a secret."""


class PreconditionFailed(StorageError):
    """A conditional write found another version of the object than the one expected."""


def is_remote(uri: str) -> bool:
    """True for object-store URLs (s3://, gs://, ...), False for paths and file://."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    return protocol not in ("file", "local")


def storage_options(uri: str, config: StorageConfig | None = None) -> dict[str, Any]:
    """fsspec options for `uri`: for s3://, the endpoint, region, profile and keys from
    `config`, the rest left to the standard AWS chain (environment, profiles, config files)."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    from .config import StorageConfig

    config = config or StorageConfig()
    endpoint = (
        config.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    botocore: dict[str, Any] = {
        "connect_timeout": config.connect_timeout_s,
        "read_timeout": config.read_timeout_s,
        "retries": {"max_attempts": config.max_attempts, "mode": "standard"},
    }
    options: dict[str, Any] = {"use_listings_cache": False}
    if endpoint:  # S3-compatible servers (SeaweedFS, MinIO, Ceph) want path-style addressing
        options["endpoint_url"] = endpoint
        botocore["s3"] = {"addressing_style": "path"}
    options["config_kwargs"] = botocore
    if config.region:
        options["client_kwargs"] = {"region_name": config.region}
    if config.profile:
        options["profile"] = config.profile
    if config.access_key_id and config.secret_access_key:
        options["key"] = config.access_key_id.get_secret_value()
        options["secret"] = config.secret_access_key.get_secret_value()
    if config.anon:
        options["anon"] = True
    return options


class Storage:
    """A prefix in a filesystem (local path, file://, or any fsspec URL) and atomic writes under it."""

    def __init__(self, uri: str, config: StorageConfig | None = None):
        self.uri = uri.rstrip("/") or uri
        self.config = config

    def __reduce__(self):  # ship the address, not the live filesystem, to Ray workers
        return (Storage, (self.uri, self.config))

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    @cached_property
    def _fs_root(self) -> tuple[Any, str]:
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(self.uri, **storage_options(self.uri, self.config))
        except ImportError as exc:
            raise StorageError(
                f"{self.uri}: {exc} (install the s3 extra: pip install 'daguerre[s3]')"
            ) from None
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
        """The full URI of a key (what metadata records as `uri`): file://... or s3://..."""
        path = self.path(key)
        if self.is_local:
            return "file://" + os.path.abspath(path)
        return self.fs.unstrip_protocol(path)

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

    def read_bytes(self, key: str) -> bytes:
        """The bytes at `key` (FileNotFoundError when there are none)."""
        return self.fs.cat_file(self.path(key))

    def write_table(self, key: str, table: Any) -> str:
        """Write an Arrow table as one Parquet object at `key`, atomically."""
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return self.write_bytes(key, buf.getvalue())

    def read_table(self, prefix: str, columns: list[str] | None = None, schema: Any = None) -> Any:
        """All Parquet fragments under `prefix` as one Arrow table, or None when there are none.

        With `schema`, fragments written before a column existed read it as nulls; the
        column `__filename` names each row's fragment. A fragment that vanishes between
        listing and reading (compaction replaced it) makes the read list again: compaction
        writes its merged files before it removes what they replace, so a fresh listing
        holds every row."""
        import pyarrow.dataset as pads

        path = self.path(prefix)
        for attempt in range(READ_RELISTS):
            if not self.fs.exists(path):
                return None
            try:
                dataset = pads.dataset(path, format="parquet", filesystem=self.fs,
                                       ignore_prefixes=[".", "_"], schema=schema)  # fmt: skip
                if not dataset.files:
                    return None
                return dataset.to_table(columns=columns)
            except OSError as exc:
                if attempt == READ_RELISTS - 1 or not vanished(exc):
                    raise
        raise AssertionError("unreachable")

    def delete(self, key_or_path: str) -> None:
        """Remove one object (a key under the prefix, or a path from `read_table`'s __filename)."""
        path = key_or_path if key_or_path.startswith(self.root) else self.path(key_or_path)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def delete_many(self, keys: list[str]) -> None:
        """Remove objects by key (on object stores in batches of 1,000, one request each)."""
        paths = [self.path(k) for k in keys]
        if self.is_local:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)
            return
        for start in range(0, len(paths), 1000):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(paths[start : start + 1000])

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """(content, version) of a small object, or None when it does not exist. The version
        is what `swap_bytes` expects: the ETag on object stores, a content digest locally."""
        path = self.path(key)
        try:
            if self.is_local:
                data = self.fs.cat_file(path)
                return data, hashlib.sha256(data).hexdigest()
            # The version first, then the content: a swap expecting that version succeeds
            # only if the object is still exactly what was read.
            version = self.fs.info(path)["ETag"]
            return self.fs.cat_file(path), version
        except FileNotFoundError:
            return None

    def swap_bytes(self, key: str, data: bytes, expected: str | None) -> str:
        """Write `data` at `key` only if its current version is `expected` (None: only if it
        does not exist); return the new version. Raises PreconditionFailed otherwise.

        Object stores do it with a conditional PUT (If-None-Match / If-Match); a local folder
        under an exclusive lock of a sibling file (one host)."""
        if self.is_local:
            return self._swap_local(key, data, expected)
        condition = {"mode": "create"} if expected is None else {"IfMatch": expected}
        try:
            out = self.fs.pipe_file(self.path(key), data, **condition)
        except OSError as exc:
            if "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower():
                raise PreconditionFailed(f"{self.url(key)}: changed by another writer") from None
            raise
        return (out or {}).get("ETag") or self.fs.info(self.path(key))["ETag"]

    def _swap_local(self, key: str, data: bytes, expected: str | None) -> str:
        import fcntl

        path = self.path(key)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read_versioned(key)
            if (current[1] if current else None) != expected:
                raise PreconditionFailed(f"{self.url(key)}: changed by another writer")
            self.write_bytes(key, data)
        return hashlib.sha256(data).hexdigest()

    def check_readable(self) -> None:
        """Raise StorageError unless the prefix exists and can be read (credentials, bucket)."""
        try:
            self.fs.info(self.root)
        except Exception as exc:
            raise StorageError(f"{self.uri}: {explain(exc, self)}") from None

    def check_writable(self) -> None:
        """Raise StorageError unless objects can be written under the prefix."""
        try:
            if not self.is_local:
                bucket = self.root.split("/", 1)[0]
                try:
                    self.fs.info(bucket)
                except FileNotFoundError:
                    raise StorageError(f"{self.uri}: no such bucket {bucket!r}") from None
            self.fs.makedirs(self.root, exist_ok=True)
            self.write_bytes(MARKER, b'{"written_by": "daguerre"}\n')
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"{self.uri}: {explain(exc, self)}") from None

    def is_output(self) -> bool:
        """True when the prefix holds a daguerre output (its marker, metadata or runs)."""
        return any(self.fs.exists(self.path(k)) for k in (MARKER, METADATA, RUNS))


def fragment_key(prefix: str, run_id: str, ids: list[str]) -> str:
    """A fragment name for a batch of one run: the same run and ids always give the same key."""
    digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:24]
    return f"{prefix}/part-{run_id}-{digest}.parquet"


def image_key(image_id: str, hashed: bool = False, ext: str = "png") -> str:
    """images/<id>.<ext>, or (hashed) images/<2 hex of the id's sha256>/<id>.<ext>: 256
    prefixes, so an object store does not throttle one hot prefix."""
    if hashed:
        return f"{IMAGES}/{hashlib.sha256(image_id.encode()).hexdigest()[:2]}/{image_id}.{ext}"
    return f"{IMAGES}/{image_id}.{ext}"


def explain(exc: BaseException, storage: Storage | None = None) -> str:
    """The cause of a storage failure in a few words, with any configured secret redacted."""
    name = type(exc).__name__
    text = (str(exc).strip().splitlines() or [name])[0]
    code = ""
    response = getattr(exc, "response", None) or getattr(exc.__cause__, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code", "")
    lowered = f"{name} {code} {text}".lower()
    if any(k in lowered for k in ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied",
                                  "forbidden", "permission", "403")):  # fmt: skip
        cause = f"access denied: the credentials were rejected ({code or text})"
    elif "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        cause = "no such bucket"
    elif isinstance(exc, FileNotFoundError) or "nosuchkey" in lowered or "not found" in lowered:
        cause = "no such file or prefix"
    elif any(k in lowered for k in ("connect", "endpoint", "timeout", "timed out", "unreachable")):
        endpoint = (
            storage_options(storage.uri, storage.config).get("endpoint_url") if storage else None
        )
        cause = f"cannot reach the storage endpoint{f' {endpoint}' if endpoint else ''} ({name})"
    elif "credentials" in lowered:
        cause = "no credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
    else:
        cause = f"{name}: {text}"
    return _redact(cause, storage)


def _redact(text: str, storage: Storage | None) -> str:
    secrets = [os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN")]
    if storage is not None and storage.config is not None and storage.config.secret_access_key:
        secrets.append(storage.config.secret_access_key.get_secret_value())
    for secret in filter(None, secrets):
        text = text.replace(secret, "***")
    return text


def transient_errors() -> tuple[type[BaseException], ...]:
    """The exception types of a storage client that a failed request may raise besides
    OSError (botocore's and aiohttp's, where installed)."""
    found: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError, ClientError

        found += [BotoCoreError, ClientError]
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError as HttpError

        found.append(HttpError)
    return tuple(found)


def vanished(exc: BaseException) -> bool:
    """True when `exc` says a listed object was gone when read."""
    text = str(exc).lower()
    return isinstance(exc, FileNotFoundError) or "no such file" in text or "not found" in text


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
