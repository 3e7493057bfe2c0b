"""An engine as the job's actors and the Serve replicas run it: one request's failure
isolated from its batch-mates (`generate_each`), the quality gate, the semantic cache, and
one thread of its own for all torch work (`EngineThread`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import EngineConfig, StorageConfig
from .engine import DiffusionEngine
from .image_inputs import ImageInput
from .quality import QualityConfig, QualityGate
from .schema import GeneratedImage, ImageRequest
from .semantic_cache import SemanticIndex, semantic_hits

Images = list[ImageInput | None]  # per request, in order: its init image, or None


def generate_each(engine: DiffusionEngine, requests: list[ImageRequest],
                  images: Images | None = None) -> list[GeneratedImage | Exception]:  # fmt: skip
    """One image or one exception per request, in order: a request whose LoRA adapter cannot
    be used fails alone first (LoraError, field `lora`); a batch that fails is retried one
    request at a time, so a single bad request cannot take its batch-mates down with it.
    `images[i]`: request i's init image (None: it has none)."""
    if not requests:
        return []
    images = images or [None] * len(requests)
    failed = engine.request_errors(requests, images)
    if failed:
        kept = [i for i in range(len(requests)) if i not in failed]
        rest = iter(generate_each(engine, [requests[i] for i in kept], [images[i] for i in kept]))
        return [failed[i] if i in failed else next(rest) for i in range(len(requests))]
    try:
        return list(engine.generate(requests, images))
    except Exception as exc:
        if len(requests) == 1:
            return [exc]
    out: list[GeneratedImage | Exception] = []
    for request, image in zip(requests, images, strict=True):
        try:
            out.append(engine.generate([request], [image])[0])
        except Exception as exc:
            out.append(exc)
    return out


class EngineThread:
    """A DiffusionEngine that lives on one thread of its own, where all its torch work runs.

    Ray calls actor methods from threads other than the constructor's (Ray Data's UDF
    thread, Serve's event loop). Two threads driving OpenMP make two thread teams that
    fight for the cores (~20% slower on a 2-core CPU, measured), and a Serve replica's
    event loop must stay free to accept requests while the engine computes."""

    def __init__(self, config: EngineConfig, storage_config: StorageConfig | None = None,
                 quality: QualityConfig | None = None, semantic: SemanticIndex | None = None):  # fmt: skip
        from concurrent.futures import ThreadPoolExecutor

        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="daguerre-engine")
        self.engine: DiffusionEngine = self.executor.submit(
            DiffusionEngine, config, None, storage_config
        ).result()
        self.gate = QualityGate(quality) if quality is not None and quality.enabled else None
        self.semantic = semantic

    def _generate(self, requests: list[ImageRequest],
                  images: Images | None = None) -> list[GeneratedImage | Exception]:  # fmt: skip
        """Near-duplicates from the semantic cache (with it), the rest made: `generate_each`,
        then the quality gate (its regenerations included); made images carry their prompt
        vector, so the write path indexes them. (Rows whose photo is named by a URI have no
        cache group, `cache_salt`: they are always made; uploads, named by content, can hit.)"""
        if self.semantic is None:
            return self._make(requests, images)
        quality = self.gate.config if self.gate is not None else None
        hits, vectors = semantic_hits(self.semantic, self.engine, requests, quality)
        images = images or [None] * len(requests)
        kept = [i for i in range(len(requests)) if i not in hits]
        made = iter(self._make([requests[i] for i in kept], [images[i] for i in kept]))
        out: list[GeneratedImage | Exception] = []
        for i in range(len(requests)):
            if i in hits:
                generated, provenance = hits[i]
                inputs = None if images[i] is None else images[i].provenance  # as asked
                out.append(dataclasses.replace(generated, made_by=provenance, inputs=inputs))
                continue
            result = next(made)
            if isinstance(result, GeneratedImage):
                result = dataclasses.replace(result, prompt_vector=vectors[i])
            out.append(result)
        return out

    def _make(self, requests: list[ImageRequest],
              images: Images | None) -> list[GeneratedImage | Exception]:  # fmt: skip
        results = generate_each(self.engine, requests, images)
        if self.gate is None:
            return results
        images = images or [None] * len(requests)

        def again(retries: list[ImageRequest], indices: list[int]) -> list[Any]:
            return generate_each(self.engine, retries, [images[i] for i in indices])

        return self.gate.run(again, requests, results)

    def generate_each(self, requests: list[ImageRequest],
                      images: Images | None = None) -> list[GeneratedImage | Exception]:  # fmt: skip
        """`generate_each` and the gate on the engine's thread (blocking the caller)."""
        return self.executor.submit(self._generate, requests, images).result()

    async def generate_each_async(self, requests: list[ImageRequest],
                                  images: Images | None = None) -> list[GeneratedImage | Exception]:  # fmt: skip
        """`generate_each` and the gate on the engine's thread, awaited without blocking the
        event loop."""
        import asyncio

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._generate, requests, images)
