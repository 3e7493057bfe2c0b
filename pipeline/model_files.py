"""Where model weights live: an object-store folder fetched once per node into the local
cache (keyed by its listing, so a changed model is fetched again), and the weights hash of
a folder, computed once per machine and listing."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import StorageConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")


def model_cache_dir() -> Path:
    """Where fetched models live on this node: $DAGUERRE_CACHE/models or ~/.cache/daguerre/models."""
    from ..kernels.unet import cache_root

    return cache_root() / "models"


def fetch_model(uri: str, storage_config: StorageConfig | None = None) -> Path:
    """A local copy of the diffusers folder at `uri`, fetched once per node and content listing.

    The copy is made in a temporary sibling and renamed into place, so concurrent actors on
    one node never load a half-copied folder (the loser of the race drops its copy)."""
    import shutil
    import uuid

    from .storage import Storage, StorageError, explain

    storage = Storage(uri, storage_config)
    try:
        listing = storage.fs.find(storage.root, detail=True)
    except Exception as exc:
        raise StorageError(f"{uri}: {explain(exc, storage)}") from None
    if not listing:
        raise StorageError(f"{uri}: no such file or prefix")
    digest = hashlib.sha256(uri.encode())
    for key in sorted(listing):
        info = listing[key]
        etag = str(info.get("ETag") or info.get("etag") or info.get("mtime") or "")
        digest.update(f"{key}\t{info.get('size')}\t{etag}\n".encode())
    name = storage.root.rsplit("/", 1)[-1]
    target = model_cache_dir() / f"{name}-{digest.hexdigest()[:16]}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        for key in listing:
            rel = key[len(storage.root) :].lstrip("/")
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            storage.fs.get_file(key, str(tmp / rel))
        try:
            tmp.rename(target)
        except OSError:  # another actor on this node finished first
            if not (target / "model_index.json").is_file():
                raise
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(f"{uri}: {explain(exc, storage)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def folder_weights_hash(path: Path) -> str:
    """sha256 over a model folder's weight files (names and bytes), in a stable order.

    Hashed once per machine and listing (names, sizes, mtimes): the digest is kept under
    $DAGUERRE_CACHE/weights, so the driver and every actor on a node pay for it once."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    listing = hashlib.sha256(str(path.resolve()).encode())
    for file in files:
        stat = file.stat()
        listing.update(f"{file.relative_to(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    from ..kernels.unet import cache_root

    memo = cache_root() / "weights" / listing.hexdigest()[:32]
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    value = "sha256:" + digest.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
    tmp.write_text(value)
    tmp.replace(memo)
    return value
