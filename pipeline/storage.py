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
import os
import posixpath
import uuid
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daguerre.pipeline.config import StorageConfig

IMAGES, METADATA, ERRORS, RUNS = "images", "metadata", "errors", "runs"
MARKER = "_daguerre"  # written at the output root when a job starts: proves write access


class StorageError(ValueError):
    """Storage that cannot be used; one line naming the URI and the cause, never a secret."""


def is_remote(uri: str) -> bool:
    """True for object-store URLs (s3://, gs://, ...), False for paths and file://."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    return protocol not in ("file", "local")


def storage_options(uri: str, config: StorageConfig | None = None) -> dict[str, Any]:
    """fsspec options for `uri`: for s3://, the endpoint, region, profile and keys from
    `config`, the rest left to the standard AWS chain (environment, profiles, config files)."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    from daguerre.pipeline.config import StorageConfig

    config = config or StorageConfig()
    endpoint = (
        config.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    botocore: dict[str, Any] = {
        "connect_timeout": config.connect_timeout_s,
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


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)
