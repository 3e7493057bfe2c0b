"""The replica's scheduler on plain asyncio: buckets, cancellation, supervision, health.

The engine here is a function that records each call, so every case is exact; the Serve
tests (test_serve.py) run the same scheduler inside a real replica."""

from __future__ import annotations

import asyncio

import pytest
from daguerre.cluster.replica import EngineLoopFailed, EngineScheduler
from daguerre.pipeline.schema import ImageRequest


class Engine:
    """Records every call; holds each call until released, so tests decide what overlaps."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_next = False

    async def run(self, requests: list[ImageRequest], images: list | None = None) -> list[str]:
        self.calls.append([r.id for r in requests])
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the engine thread is gone")
        images = images or [None] * len(requests)
        return [f"image of {r.id}" + (f" from {m}" if m else "")
                for r, m in zip(requests, images, strict=True)]  # fmt: skip


def request(i: int, steps: int = 4) -> ImageRequest:
    return ImageRequest(id=f"r{i}", prompt="x", steps=steps)


def scheduler(engine: Engine, batch: int = 4) -> EngineScheduler:
    return EngineScheduler(engine.run, lambda r: r.steps, max_batch_size=batch)


async def until(condition, what: str) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


def test_init_images_travel_with_their_request_even_when_ids_repeat():
    """Two callers (two jobs on one app) may send the same id with different photos: each
    request is made from its own, in one engine batch."""

    async def main():
        engine = Engine()
        engine.gate.clear()
        s = scheduler(engine)
        first = asyncio.create_task(s.generate([request(9)]))
        await until(lambda: engine.calls, "the first call")
        a = asyncio.create_task(s.generate([request(0), request(1)], images=["photo A", None]))
        b = asyncio.create_task(s.generate([request(0)], images=["photo B"]))
        await until(lambda: s.stats()["pending"] == 3, "three waiting")
        engine.gate.set()
        await first
        return await a, await b, engine.calls

    a, b, calls = asyncio.run(main())
    assert a == ["image of r0 from photo A", "image of r1"] and b == ["image of r0 from photo B"]
    assert calls[1] == ["r0", "r1", "r0"]  # one batch


def test_waiting_requests_run_by_bucket_up_to_the_batch_size():
    async def main():
        engine = Engine()
        engine.gate.clear()
        s = scheduler(engine)
        first = asyncio.create_task(s.generate([request(0)]))
        await until(lambda: engine.calls, "the first call")
        rest = [asyncio.create_task(s.generate([request(i, steps=4 + i % 2)])) for i in range(1, 8)]
        await until(lambda: s.stats()["pending"] == 7, "seven waiting")
        engine.gate.set()
        await asyncio.gather(first, *rest)
        return engine.calls

    calls = asyncio.run(main())
    assert calls == [["r0"], ["r1", "r3", "r5", "r7"], ["r2", "r4", "r6"]]  # oldest bucket first


def test_cancelled_requests_are_never_started():
    async def main():
        engine = Engine()
        engine.gate.clear()
        s = scheduler(engine)
        busy = asyncio.create_task(s.generate([request(0)]))
        await until(lambda: engine.calls, "the busy call")
        leaving = asyncio.create_task(s.generate([request(1), request(2)]))
        staying = asyncio.create_task(s.generate([request(3)]))
        await until(lambda: s.stats()["pending"] == 3, "three waiting")
        leaving.cancel()  # the client went away
        engine.gate.set()
        assert await busy == ["image of r0"] and await staying == ["image of r3"]
        with pytest.raises(asyncio.CancelledError):
            await leaving
        return engine.calls, s.stats()

    calls, stats = asyncio.run(main())
    assert calls == [["r0"], ["r3"]]
    assert stats["dropped_cancelled"] == 2 and stats["images"] == 2


def test_a_failed_loop_fails_the_waiting_with_a_clear_error_and_restarts():
    async def main():
        engine = Engine()
        engine.gate.clear()
        s = scheduler(engine)
        engine.fail_next = True
        broken = asyncio.create_task(s.generate([request(0)]))
        await until(lambda: engine.calls, "the failing call")
        waiting = asyncio.create_task(s.generate([request(1, steps=9)]))
        await until(lambda: s.stats()["pending"] == 1, "one waiting")
        engine.gate.set()
        errors = []
        for task in (broken, waiting):
            with pytest.raises(EngineLoopFailed) as caught:
                await task
            errors.append(str(caught.value))
        after = await s.generate([request(2)])  # the loop was restarted
        return errors, after, s

    errors, after, s = asyncio.run(main())
    assert "the engine thread is gone" in errors[0]
    assert "engine loop failed" in errors[1] and "retry" in errors[1]
    assert after == ["image of r2"] and s.stats()["loop_failures"] == 1
    assert s.health_problem() is None  # one failure: restarted, still healthy


def test_repeated_failures_or_a_hung_call_make_the_replica_unhealthy():
    async def fail_three_times():
        engine = Engine()
        s = scheduler(engine)
        for i in range(3):
            engine.fail_next = True
            with pytest.raises(EngineLoopFailed):
                await s.generate([request(i)])
        return s

    s = asyncio.run(fail_three_times())
    assert "failed 3 times" in s.health_problem()

    async def hang():
        engine = Engine()
        engine.gate.clear()
        s = EngineScheduler(engine.run, lambda r: r.steps, max_batch_size=4, stuck_after_s=0.05)
        task = asyncio.create_task(s.generate([request(0)]))
        await until(lambda: engine.calls, "the call")
        await asyncio.sleep(0.1)
        problem = s.health_problem()
        engine.gate.set()
        await task
        return problem, s.health_problem()

    during, after = asyncio.run(hang())
    assert "one engine call has run for" in during and after is None


def test_online_goes_first_and_batch_work_fills_the_rest():
    """While a batch runs, 10 batch-job requests and then 2 online ones wait: the next engine
    call is the online requests' bucket with batch work of that bucket filling it; the
    online requests never wait behind more than the call already running."""
    from daguerre.cluster.replica import BATCH

    async def main():
        engine = Engine()
        engine.gate.clear()
        s = EngineScheduler(
            engine.run, lambda r: r.steps, max_batch_size=4, online_fill_slack=None
        )  # always fill: the cost rule is tested below
        running = asyncio.create_task(s.generate([request(0)], BATCH))
        await until(lambda: engine.calls, "the running batch")
        jobs = [asyncio.create_task(s.generate([request(i, steps=4 + i % 2)], BATCH))
                for i in range(1, 11)]  # fmt: skip
        online = asyncio.create_task(s.generate([request(20, steps=5), request(21, steps=5)]))
        await until(lambda: s.stats()["pending"] == 12, "twelve waiting")
        engine.gate.set()
        await asyncio.gather(running, online, *jobs)
        return engine.calls, s.stats()

    calls, stats = asyncio.run(main())
    assert calls[1] == ["r20", "r21", "r1", "r3"]  # online first, its bucket filled by batch work
    assert calls[2] == ["r2", "r4", "r6", "r8"]  # then the oldest batch bucket
    assert stats["images_online"] == 2 and stats["images_batch"] == 11


class TimedEngine(Engine):
    """An engine whose call takes `cost(n)` seconds for n images (a fake clock, advanced by
    the scheduler's own timer), so the scheduler learns each batch size's cost."""

    def __init__(self, cost):
        super().__init__()
        self.cost, self.now = cost, 0.0

    def clock(self) -> float:
        return self.now

    async def run(self, requests: list[ImageRequest], images: list | None = None) -> list[str]:
        self.now += self.cost(len(requests))
        return await super().run(requests, images)


def _online_under_batch_load(cost, slack: float | None = 0.25, lessons: int = 1) -> list[list[str]]:
    """Teach the scheduler `lessons` times (online alone, then full batch work), then send an
    online request while batch work waits: the engine calls that follow."""
    from daguerre.cluster.replica import BATCH

    async def main():
        engine = TimedEngine(cost)
        s = EngineScheduler(engine.run, lambda r: r.steps, max_batch_size=4,
                            online_fill_slack=slack, clock=engine.clock)  # fmt: skip
        for _ in range(lessons):
            await s.generate([request(0)])  # the cost of one online image alone
            await s.generate([request(i) for i in range(1, 5)], BATCH)  # ... and of a full batch
        engine.calls.clear()
        engine.gate.clear()
        running = asyncio.create_task(s.generate([request(5)], BATCH))
        await until(lambda: engine.calls, "the running batch")
        jobs = [asyncio.create_task(s.generate([request(i)], BATCH)) for i in range(6, 12)]
        online = asyncio.create_task(s.generate([request(20)]))
        await until(lambda: s.stats()["pending"] == 7, "seven waiting")
        engine.gate.set()
        await asyncio.gather(running, online, *jobs)
        return engine.calls

    return asyncio.run(main())


def test_batch_work_fills_an_online_batch_only_where_that_costs_little():
    """Where a batch of 4 costs about what 1 image costs (a GPU), batch work fills the online
    request's batch; where the cost grows with the images (a CPU), the online request runs
    alone, so it waits behind one engine batch and then only its own image."""
    flat = _online_under_batch_load(lambda n: 1.0 + 0.02 * n, slack=0.25)
    assert flat[1] == ["r20", "r6", "r7", "r8"]
    linear = _online_under_batch_load(lambda n: 0.5 * n, slack=0.25)
    assert linear[1] == ["r20"] and linear[2] == ["r6", "r7", "r8", "r9"]
    always = _online_under_batch_load(lambda n: 0.5 * n, slack=None)  # None: always fill
    assert always[1] == ["r20", "r6", "r7", "r8"]


def test_an_unmeasured_online_batch_runs_alone_once_to_learn_its_cost():
    from daguerre.cluster.replica import BATCH

    async def main():
        engine = TimedEngine(lambda n: 1.0)
        s = EngineScheduler(engine.run, lambda r: r.steps, max_batch_size=4, clock=engine.clock)
        engine.gate.clear()
        running = asyncio.create_task(s.generate([request(0, steps=5)], BATCH))
        await until(lambda: engine.calls, "the running batch")
        jobs = [asyncio.create_task(s.generate([request(i)], BATCH)) for i in range(1, 8)]
        online = asyncio.create_task(s.generate([request(20)]))
        await until(lambda: s.stats()["pending"] == 8, "eight waiting")
        engine.gate.set()
        await asyncio.gather(running, online, *jobs)
        return engine.calls

    calls = asyncio.run(main())
    assert calls[1] == ["r20"]  # nothing known of one image's cost yet: alone, once


def test_a_cold_first_call_does_not_decide_the_fill():
    """The first engine call of a size is cold (kernel timing, compilation): its time is
    replaced by the second's, so a slow start does not keep batches from filling."""
    seen: set[int] = set()

    def cost(n: int) -> float:
        cold = n not in seen
        seen.add(n)
        return 10.0 if cold else 1.0 + 0.02 * n

    assert _online_under_batch_load(cost, lessons=2)[1] == ["r20", "r6", "r7", "r8"]
