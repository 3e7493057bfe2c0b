"""A fault-injecting HTTP proxy in front of the test S3 server (127.0.0.1 only).

It forwards every request unchanged (the Host header too, so SigV4 signatures still hold)
and, by rule, answers some with what a throttled or flaky object store does: 503 SlowDown
without forwarding, a connection cut in the middle of a request body, a reply held back
longer than the client waits. Counts what it did, so tests can tell faults happened.
"""

from __future__ import annotations

import asyncio
import collections
import re
import threading
from dataclasses import dataclass, field

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class FaultRules:
    """Which requests fail and how (counted per method; 0 turns a rule off)."""

    slow_down_every_put: int = 0  # every Nth PUT: 503 SlowDown
    cut_every_put: int = 0  # every Nth PUT: the connection cut mid-body
    slow_down_every_get: int = 0  # every Nth GET/HEAD: 503 SlowDown
    delay_every_get: int = 0  # every Nth GET: the reply held `delay_s`
    delay_s: float = 0.0
    always_fail_key: str | None = None  # PUTs to keys matching this regex: always 503
    counts: collections.Counter = field(default_factory=collections.Counter)


class FaultProxy:
    """`with FaultProxy(upstream, rules) as proxy:` then use `proxy.endpoint`."""

    def __init__(self, upstream: str, rules: FaultRules):
        self.upstream, self.rules = upstream.rstrip("/"), rules
        self.endpoint = ""
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._seen: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("the fault proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        import aiohttp
        from aiohttp import web

        self._stop = asyncio.Event()
        self._client = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self._started.set()
        await self._stop.wait()
        await self._client.close()
        await runner.cleanup()

    def _nth(self, method: str) -> int:
        with self._lock:
            self._seen[method] += 1
            return self._seen[method]

    async def _handle(self, request):  # noqa: ANN001, ANN201
        from aiohttp import web

        rules, method = self.rules, request.method
        kind = "PUT" if method in ("PUT", "POST") else "GET"
        n = self._nth(kind)
        if kind == "PUT" and rules.always_fail_key and re.search(rules.always_fail_key,
                                                                 request.path):  # fmt: skip
            await request.read()
            rules.counts["always_fail"] += 1
            return web.Response(status=503, body=SLOW_DOWN, content_type="application/xml")
        if kind == "PUT" and rules.cut_every_put and n % rules.cut_every_put == 0:
            await request.content.read(16)  # part of the body, then the line goes dead
            rules.counts["cut"] += 1
            request.transport.abort()
            return web.Response(status=500)  # never sent: the transport is gone
        every = rules.slow_down_every_put if kind == "PUT" else rules.slow_down_every_get
        if every and n % every == 0:
            await request.read()
            rules.counts[f"slow_down_{kind.lower()}"] += 1
            return web.Response(status=503, body=SLOW_DOWN, content_type="application/xml",
                                headers={"Retry-After": "0"})  # fmt: skip
        if kind == "GET" and rules.delay_every_get and n % rules.delay_every_get == 0:
            rules.counts["delayed"] += 1
            await asyncio.sleep(rules.delay_s)
        return await self._forward(request)

    async def _forward(self, request):  # noqa: ANN001, ANN201
        from aiohttp import web

        body = await request.read()
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("transfer-encoding",)}  # fmt: skip
        async with self._client.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body,
            allow_redirects=False, skip_auto_headers=("Content-Type", "User-Agent"),
        ) as upstream:  # fmt: skip
            payload = await upstream.read()
            dropped = ("transfer-encoding", "content-encoding", "connection")
            if request.method != "HEAD":  # a HEAD's Content-Length is the object's size
                dropped += ("content-length",)
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in dropped}
            if request.method == "HEAD":
                return web.Response(status=upstream.status, headers=out)
            return web.Response(status=upstream.status, body=payload, headers=out)
