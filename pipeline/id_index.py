"""Sets of ids that scale to tens of millions: sorted 128-bit digests in one numpy array.

A job's planning needs two sets over the manifest (ids that appear more than once, ids
already finished) and its read stage asks, for every row, whether its id is in them.
Python sets of 10M strings take gigabytes and do not travel; these indexes take 16 bytes
an id, are built block by block (so Ray Data can build them across a cluster), travel
through Ray's object store as one read-only array that every worker maps without a copy,
and answer a block's lookups with one `searchsorted`. Two ids share a digest with a
probability of about n^2 / 2^129 (1e-25 for ten million ids): treated as never.

Pure numpy and pyarrow: no Ray here (cluster/planning.py runs these across a cluster).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

DIGEST = np.dtype("S16")


def id_digests(ids: Any) -> np.ndarray:
    """The 16-byte digest of each id (an Arrow array or a list of str), in order. Arrow ids
    are cast to strings first, as the read stage casts them (int or binary id columns)."""
    if hasattr(ids, "to_pylist"):
        import pyarrow as pa
        import pyarrow.compute as pc

        if not pa.types.is_string(ids.type):
            ids = pc.cast(ids, pa.string())
        values = ids.to_pylist()
    else:
        values = ids
    return np.array(
        [hashlib.blake2b(("" if v is None else str(v)).encode(), digest_size=16).digest()
         for v in values],
        dtype=DIGEST,
    )  # fmt: skip


def to_arrow(digests: np.ndarray) -> Any:
    """Digests as an Arrow fixed_size_binary(16) array, byte for byte (numpy's S16 would go
    through Arrow's string conversion, which cuts values at a NUL byte)."""
    import pyarrow as pa

    digests = np.ascontiguousarray(digests, dtype=DIGEST)
    data = pa.py_buffer(digests.tobytes())
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(digests), [None, data])


def from_arrow(array: Any) -> np.ndarray:
    """The S16 digests of an Arrow fixed_size_binary(16) array (or chunked array), nulls dropped."""
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks else pa.array([], pa.binary(16))
    if array.null_count:
        array = array.drop_null()
    if len(array) == 0:
        return np.empty(0, dtype=DIGEST)
    data = np.frombuffer(array.buffers()[1], dtype=DIGEST)
    return data[array.offset : array.offset + len(array)]


@dataclass
class IdIndex:
    """A sorted, duplicate-free array of id digests, with an optional value per digest."""

    digests: np.ndarray  # [n] S16, sorted, unique
    values: np.ndarray | None = None  # [n] aligned with digests

    @classmethod
    def build(cls, digests: np.ndarray, values: np.ndarray | None = None) -> IdIndex:
        """The index of `digests` (any order; for repeats, the first value wins)."""
        digests = np.asarray(digests, dtype=DIGEST)
        unique, first = np.unique(digests, return_index=True)
        return cls(unique, None if values is None else np.asarray(values)[first])

    @classmethod
    def empty(cls) -> IdIndex:
        return cls(np.empty(0, dtype=DIGEST))

    def __len__(self) -> int:
        return len(self.digests)

    def positions(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, position in the index) of each digest."""
        if len(self.digests) == 0:
            return np.zeros(len(digests), dtype=bool), np.zeros(len(digests), dtype=np.int64)
        at = np.searchsorted(self.digests, digests)
        at = np.minimum(at, len(self.digests) - 1)
        return self.digests[at] == digests, at

    def contains(self, digests: np.ndarray) -> np.ndarray:
        """A mask: which of `digests` are in the index."""
        return self.positions(digests)[0]


def repeated(digests: np.ndarray) -> IdIndex:
    """The index of the digests that occur more than once in `digests`."""
    unique, counts = np.unique(np.asarray(digests, dtype=DIGEST), return_counts=True)
    return IdIndex(unique[counts > 1])
