"""The engine deployment: one DiffusionEngine per Serve replica, fed by a scheduler of ours.

    ingress call (the images of one HTTP request)  -> online queue, one future per image
    batch-job call (one engine batch of a job)     -> batch queue
    scheduler loop: wait for work -> the oldest online request's bucket (size, steps,
    scheduler) first, filled up to max_batch_size with online then batch work of that
    bucket; with no online work waiting, the oldest batch request's bucket -> one engine
    call on the engine's own thread -> answer each future

So an online request never waits behind more than the one engine batch already running,
and batch work fills the rest of every batch and all idle time.

Why not `@serve.batch`: it is one FIFO queue that forms its next batch as soon as the
previous one starts, cannot drop work whose caller went away, and has no notion of a
bucket. Here a caller that disconnects cancels its futures, and the loop never starts
them; work already in the engine finishes and is discarded. The loop is supervised: if
it fails, the waiting requests get a clear error and it restarts; after repeated
failures, or when one engine call runs far too long, `check_health` fails so Serve
replaces the replica.

No `from __future__ import annotations`: Serve pickles deployment classes by value at
decoration, so what they use must be defined above them.
"""

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ray import serve

from ..pipeline.config import EngineConfig, RequestRefused, StorageConfig, first_line
from ..pipeline.files import Provenance
from ..pipeline.image_inputs import ImageInput
from ..pipeline.quality import QualityConfig, Rejected
from ..pipeline.schema import GeneratedImage, ImageRequest
from ..pipeline.semantic_cache import SemanticIndex

logger = logging.getLogger("ray.serve")


class EngineLoopFailed(RuntimeError):
    """The replica's engine loop failed while a request waited; the request was not made."""


@dataclass
class ReplicaImage:
    """What a replica returns for one request: the raw image and its provenance."""

    image: GeneratedImage
    provenance: Provenance


ONLINE, BATCH = "online", "batch"  # the two classes of work a replica serves


@dataclass
class _Waiting:
    request: ImageRequest
    future: asyncio.Future
    key: Any
    priority: str
    image: ImageInput | None = None  # its init image (img2img, inpainting)


class EngineScheduler:
    """Batches waiting requests by bucket for one engine; drops cancelled work; supervised.

    `run_batch` makes one engine call (requests and their init images, in order -> one
    result or exception each).
    Pure asyncio, so it is tested without Serve (tests/cpu/test_replica.py)."""

    def __init__(
        self,
        run_batch: Callable[[list[ImageRequest], list[Any]], Awaitable[list[Any]]],
        bucket_key: Callable[[ImageRequest], Any],
        max_batch_size: int,
        batch_wait_timeout_s: float = 0.0,
        max_failures: int = 3,
        stuck_after_s: float = 900.0,
        online_fill_slack: float | None = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.run_batch, self.bucket_key = run_batch, bucket_key
        self.online_fill_slack, self.clock = online_fill_slack, clock
        self.batch_seconds: dict[tuple[Any, int], float] = {}  # (bucket, images) -> seconds
        self.timings_seen: dict[tuple[Any, int], int] = {}
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self.max_failures, self.stuck_after_s = max_failures, stuck_after_s
        self.waiting: dict[str, collections.deque[_Waiting]] = {
            ONLINE: collections.deque(), BATCH: collections.deque(),
        }  # fmt: skip
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.running_since: float | None = None  # when the engine call in progress started
        self.running = 0  # requests in that call
        self.failures: list[float] = []  # times the loop failed
        self.images = 0
        self.images_by_priority: collections.Counter[str] = collections.Counter()
        self.dropped_cancelled = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()

    # -- callers -------------------------------------------------------------------------

    async def generate(self, requests: list[ImageRequest], priority: str = ONLINE,
                       images: list[Any] | None = None) -> list[Any]:  # fmt: skip
        """One result per request (an image or the exception that stopped it); `images[i]`:
        request i's init image, kept with it while it waits. If the caller is cancelled,
        its requests that have not started are dropped."""
        images = images or [None] * len(requests)
        futures = [self.submit(r, priority, m) for r, m in zip(requests, images, strict=True)]
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise

    def submit(self, request: ImageRequest, priority: str = ONLINE,
               image: Any = None) -> asyncio.Future:  # fmt: skip
        future = asyncio.get_running_loop().create_future()
        key = self.bucket_key(request)
        self.waiting[priority].append(_Waiting(request, future, key, priority, image))
        self._ensure_loop()
        self._wakeup.set()
        return future

    def health_problem(self) -> str | None:
        """Why this scheduler should not be trusted with more work (None when healthy)."""
        recent = [t for t in self.failures if time.monotonic() - t < 300]
        if len(recent) >= self.max_failures:
            return f"the engine loop failed {len(recent)} times in 5 minutes"
        if self.running_since and time.monotonic() - self.running_since > self.stuck_after_s:
            return f"one engine call has run for {time.monotonic() - self.running_since:.0f} s"
        return None

    def pending(self, priority: str | None = None) -> int:
        """Requests waiting (not cancelled), of one class or both."""
        queues = [self.waiting[priority]] if priority else list(self.waiting.values())
        return sum(1 for q in queues for w in q if not w.future.cancelled())

    def stats(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "images_online": self.images_by_priority[ONLINE],
            "images_batch": self.images_by_priority[BATCH],
            "batches": sum(self.batch_sizes.values()),
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "pending": self.pending(),
            "pending_online": self.pending(ONLINE),
            "pending_batch": self.pending(BATCH),
            "running": self.running,
            "dropped_cancelled": self.dropped_cancelled,
            "online_fill_slack": self.online_fill_slack,
            "loop_failures": len(self.failures),
        }

    # -- the loop --------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())
            self._loop_task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task) -> None:
        """Supervision: fail every waiting request with the cause, restart if work remains."""
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            return
        self.failures.append(time.monotonic())
        self.running, self.running_since = 0, None
        logger.error("daguerre engine loop failed; restarting it", exc_info=error)
        failure = EngineLoopFailed(f"the replica's engine loop failed ({type(error).__name__}: "
                                   f"{error}); it was restarted, retry the request")  # fmt: skip
        for queue in self.waiting.values():
            while queue:
                waiting = queue.popleft()
                if not waiting.future.done():
                    waiting.future.set_exception(failure)

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self.batch_wait_timeout_s and self.pending() < self.max_batch_size:
                await asyncio.sleep(self.batch_wait_timeout_s)  # let a batch gather
            while any(self.waiting.values()):
                batch = self._take_batch()
                if batch:
                    await self._run(batch)

    def _take_batch(self) -> list[_Waiting]:
        """The next engine batch: the oldest online request's bucket, filled with online and
        then batch work of that bucket; with no online work, the oldest batch request's
        bucket. At most max_batch_size; cancelled requests are dropped on the way."""
        for queue in self.waiting.values():
            live = [w for w in queue if not w.future.cancelled()]
            self.dropped_cancelled += len(queue) - len(live)
            queue.clear()
            queue.extend(live)
        first = self.waiting[ONLINE] or self.waiting[BATCH]
        if not first:
            return []
        key, batch = first[0].key, []
        for priority in (ONLINE, BATCH):
            rest: collections.deque[_Waiting] = collections.deque()
            for waiting in self.waiting[priority]:
                if (
                    waiting.key == key
                    and len(batch) < self.max_batch_size
                    and (priority == ONLINE or self._fill_pays(key, batch))
                ):
                    batch.append(waiting)
                else:
                    rest.append(waiting)
            self.waiting[priority] = rest
        return batch

    def _fill_pays(self, key: Any, batch: list[_Waiting]) -> bool:
        """Whether one more batch-work image may join this batch: always when it holds only
        batch work; with online work in it, only while the batch's expected time stays within
        `online_fill_slack` of the online work's alone (on a GPU a batch of 4 costs about one
        image; on a CPU each image adds its own time). An unmeasured cost runs alone once."""
        online = sum(1 for w in batch if w.priority == ONLINE)
        if online == 0 or self.online_fill_slack is None:
            return True
        alone = self.batch_seconds.get((key, online))
        if alone is None:
            return False
        return self._expected_s(key, len(batch) + 1) <= (1 + self.online_fill_slack) * alone

    def _expected_s(self, key: Any, images: int) -> float:
        """Expected seconds of an engine call of `images` in bucket `key`, from the calls this
        scheduler has timed: measured, interpolated, or (above the largest measured size)
        grown in proportion, the cautious guess."""
        points = sorted((n, s) for (k, n), s in self.batch_seconds.items() if k == key)
        below = [p for p in points if p[0] <= images]  # never empty: the online size is known
        above = [p for p in points if p[0] > images]
        (n0, s0) = below[-1]
        if n0 == images or not above:
            return s0 * images / n0
        (n1, s1) = above[0]
        return s0 + (s1 - s0) * (images - n0) / (n1 - n0)

    def _timed(self, key: Any, images: int, seconds: float) -> None:
        """Learn an engine call's cost: a moving average per bucket and batch size, whose
        first sample (a cold call: kernel timing, compilation, graph capture) the second
        replaces."""
        slot = (key, images)
        seen = self.timings_seen[slot] = self.timings_seen.get(slot, 0) + 1
        known = self.batch_seconds.get(slot)
        self.batch_seconds[slot] = seconds if seen <= 2 else 0.7 * known + 0.3 * seconds

    async def _run(self, batch: list[_Waiting]) -> None:
        self.running, self.running_since = len(batch), time.monotonic()
        started = self.clock()
        try:
            results = await self.run_batch([w.request for w in batch], [w.image for w in batch])
        except Exception as exc:  # the engine call itself broke: its requests fail, then the loop
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(EngineLoopFailed(f"the engine call failed: {exc}"))
            raise
        self.running, self.running_since = 0, None
        self._timed(batch[0].key, len(batch), self.clock() - started)
        self.batch_sizes[len(batch)] += 1
        self.images += len(batch)
        self.images_by_priority.update(w.priority for w in batch)
        for waiting, result in zip(batch, results, strict=True):
            if not waiting.future.done():  # a caller that left gets nothing
                waiting.future.set_result(result)


@serve.deployment(name="Engine")
class EngineDeployment:
    """One DiffusionEngine per replica (one GPU each, or a CPU share)."""

    def __init__(
        self,
        engine_config: dict[str, Any],
        batch_wait_timeout_s: float,
        storage_config: StorageConfig | None = None,
        max_replicas: int = 1,
        online_fill_slack: float | None = 0.25,
        quality: QualityConfig | None = None,
        semantic: SemanticIndex | None = None,
    ):
        import ray

        from ..pipeline.engine_thread import EngineThread

        self._thread = EngineThread(EngineConfig(**engine_config), storage_config, quality,
                                    semantic)  # fmt: skip
        engine = self._thread.engine
        context = ray.get_runtime_context()
        self.provenance = Provenance(
            model=engine.model.name,
            weights_hash=engine.model.weights_hash,
            backend=engine.backend,
            node_id=context.get_node_id(),
            actor_id=context.get_actor_id() or "",
        )
        self.scheduler = EngineScheduler(
            self._run_and_record, engine.bucket_key, engine.config.max_batch_size,
            batch_wait_timeout_s, online_fill_slack=online_fill_slack,
        )  # fmt: skip
        self._busy_s, self._first_call = 0.0, None
        self.description = {
            "model": engine.model.name, "weights_hash": engine.model.weights_hash,
            "backend": engine.backend, "default_size": engine.model.default_size,
            "family": engine.model.family,
            "max_batch_size": engine.config.max_batch_size, "max_replicas": max_replicas,
        }  # fmt: skip

    async def _run_and_record(self, requests: list[ImageRequest],
                              images: list[Any]) -> list[Any]:  # fmt: skip
        """One engine call, with its metrics (cluster/metrics.py)."""
        from . import metrics

        model = self.provenance.model
        metrics.set_queue_depth(
            model, self.scheduler.pending(ONLINE), self.scheduler.pending(BATCH)
        )
        started = time.monotonic()
        self._first_call = self._first_call or started
        results = await self._thread.generate_each_async(requests, images)
        ended = time.monotonic()
        self._busy_s += ended - started
        metrics.observe_stage("generate", "serve", ended - started)
        metrics.record_images("serve", model, sum(not isinstance(r, Exception) for r in results))
        metrics.set_busy_fraction("serve", self.provenance.actor_id,
                                  self._busy_s / max(ended - self._first_call, 1e-9))  # fmt: skip
        return results

    async def _scheduled(self, requests: list[ImageRequest], priority: str,
                         images: dict[str, ImageInput] | None) -> list[Any]:  # fmt: skip
        """The scheduler's results for `requests`, their init images (by id) at hand while
        they wait (ids are unique among the requests in flight: a job's, or namespaced)."""
        self._images.update(images or {})
        try:
            return await self.scheduler.generate(requests, priority)
        finally:
            for request in requests:
                self._images.pop(request.id, None)

    async def generate(self, requests: list[ImageRequest],
                       images: list[ImageInput | None] | None = None) -> list[ReplicaImage]:  # fmt: skip
        """Online: one image per request, ahead of batch work; concurrent calls share batches.
        `images[i]`: request i's init image (img2img, inpainting), or None."""
        results = await self.scheduler.generate(requests, ONLINE, images)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return [ReplicaImage(image=r, provenance=self._provenance_of(r)) for r in results]

    async def generate_batch(
        self, requests: list[ImageRequest], images: list[ImageInput | None] | None = None
    ) -> list[ReplicaImage | Rejected | RequestRefused | str]:
        """A batch job's engine call: behind online work; one image, the quality gate's
        Rejected, or the failure's one-line reason per request (a bad request does not fail
        its batch-mates)."""
        results = await self.scheduler.generate(requests, BATCH, images)
        return [
            r if isinstance(r, (Rejected, RequestRefused))
            else f"{type(r).__name__}: {first_line(r)}" if isinstance(r, Exception)
            else ReplicaImage(image=r, provenance=self._provenance_of(r))
            for r in results
        ]  # fmt: skip

    def _provenance_of(self, image: GeneratedImage) -> Provenance:
        """What made `image`: this replica, or for a semantic-cache hit the stored maker."""
        return Provenance(**image.made_by) if image.made_by else self.provenance

    async def describe(self) -> dict[str, Any]:
        """What this replica runs: model, weights hash, backend, native size, batch size."""
        return self.description

    async def stats(self) -> dict[str, Any]:
        """This replica's counters: images made, engine batches by size, requests waiting."""
        return {"replica": self.provenance.actor_id, **self.scheduler.stats()}

    def check_health(self) -> None:
        """Serve's health probe: a replica whose engine loop keeps failing or hangs is replaced."""
        problem = self.scheduler.health_problem()
        if problem:
            raise RuntimeError(f"daguerre engine replica unhealthy: {problem}")
