"""The lease on an output prefix: one run writes into an output at a time.

A run takes `<output>/_lease.json` before it writes anything and renews it every few
seconds; a second run into the same output refuses with one line naming the holder.
A lease is taken over when its holder released it, stopped renewing it for `ttl_s`, or
ran on this host under a pid that no longer exists (a killed driver). Every change is a
conditional write (`Storage.swap_bytes`: If-None-Match / If-Match on object stores, a lock
file locally), so of two runs racing for a stale lease exactly one wins.

Writers check the lease before each batch (`check_lease`): the workers of a run that lost
its lease (an orphan of a killed driver, still running on the cluster) stop writing. A
taken-over lease only admits writes `grace_s` after the take-over, so a batch an orphan
was already writing lands before the new run writes anything.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

from .storage import PreconditionFailed, Storage, StorageError

LEASE_KEY = "_lease.json"


class LeaseHeld(StorageError):
    """Another run holds the output's lease; the message names it."""


class LeaseLost(StorageError):
    """This run no longer holds the output's lease; its writes stop."""


@dataclass
class LeaseRecord:
    """What `_lease.json` holds."""

    run_id: str
    host: str
    pid: int
    acquired_at: float  # seconds since the epoch
    renewed_at: float
    ttl_s: float
    writes_from: float  # no write before this time (a take-over's grace)
    released: bool = False

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord:
        return cls(**json.loads(data))

    def stale_because(self, now: float) -> str | None:
        """Why another run may take this lease over (None while its holder is alive)."""
        if self.released:
            return "released"
        if now - self.renewed_at > self.ttl_s:
            return f"not renewed for {now - self.renewed_at:.0f} s"
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return f"its driver (pid {self.pid}) is gone"
        return None

    def describe(self, now: float) -> str:
        since = dt.datetime.fromtimestamp(self.acquired_at, dt.timezone.utc)
        return (
            f"run {self.run_id} (host {self.host}, pid {self.pid}, since "
            f"{since:%Y-%m-%d %H:%M:%S} UTC, renewed {now - self.renewed_at:.0f} s ago)"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLease:
    """This run's lease on an output prefix: acquire, renew in the background, release."""

    def __init__(self, storage: Storage, run_id: str, ttl_s: float = 30.0, grace_s: float = 10.0):
        self.storage, self.run_id, self.ttl_s, self.grace_s = storage, run_id, ttl_s, grace_s
        self.version: str | None = None
        self.lost = threading.Event()
        self.lost_reason = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: str | None = None  # why the previous holder's lease was stale

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeld naming the run that holds it."""
        now = time.time()
        current = self.storage.read_versioned(LEASE_KEY)
        expected, writes_from = None, now
        if current is not None:
            held = LeaseRecord.parse(current[0])
            self.took_over = held.stale_because(now)
            if self.took_over is None:
                raise LeaseHeld(
                    f"{self.storage.url('')} is being written by {held.describe(now)}; "
                    "wait for it to finish or use another --out"
                )
            expected = current[1]
            if not held.released:  # its workers may still be finishing a batch
                writes_from = now + self.grace_s
        record = LeaseRecord(
            run_id=self.run_id, host=socket.gethostname(), pid=os.getpid(), acquired_at=now,
            renewed_at=now, ttl_s=self.ttl_s, writes_from=writes_from,
        )  # fmt: skip
        try:
            self.version = self.storage.swap_bytes(LEASE_KEY, record.to_bytes(), expected)
        except PreconditionFailed:  # another run took it between our read and write
            self.took_over = None
            return self.acquire()
        self._record = record
        self._thread = threading.Thread(target=self._renew_loop, name="daguerre-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        last_ok = time.time()
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._record.renewed_at = time.time()
                self.version = self.storage.swap_bytes(
                    LEASE_KEY, self._record.to_bytes(), self.version
                )
                last_ok = time.time()
            except PreconditionFailed:
                current = self.storage.read_versioned(LEASE_KEY)
                holder = LeaseRecord.parse(current[0]).run_id if current else "nobody"
                self._lose(f"the output lease was taken over by run {holder}")
                return
            except Exception as exc:  # storage hiccup: retry until the lease would expire
                if time.time() - last_ok > self.ttl_s:
                    self._lose(f"could not renew the output lease for {self.ttl_s:.0f} s ({exc})")
                    return

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        self.lost.set()

    def release(self) -> None:
        """Mark the lease released (the next run takes it at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.version is None or self.lost.is_set():
            return
        self._record.released = True
        try:
            self.storage.swap_bytes(LEASE_KEY, self._record.to_bytes(), self.version)
        except (PreconditionFailed, OSError):
            pass  # taken over or unreachable: it expires on its own


def check_lease(storage: Storage, run_id: str) -> None:
    """Raise LeaseLost unless `run_id` holds the output's lease; wait out a take-over's grace."""
    current = storage.read_versioned(LEASE_KEY)
    record = LeaseRecord.parse(current[0]) if current else None
    if record is None or record.run_id != run_id or record.released:
        holder = f"run {record.run_id}" if record and not record.released else "no run"
        raise LeaseLost(
            f"{storage.url('')}: run {run_id} no longer holds the output lease ({holder} does); "
            "its writes stop"
        )
    wait = record.writes_from - time.time()
    if wait > 0:
        time.sleep(wait)
