"""The semantic cache: a request whose prompt is a near-duplicate of one already made, with
every other parameter the same, is answered from that stored image (opt-in:
`cache.semantic_threshold`).

Prompts are embedded with the model's own text encoder (its pooled output: CLIP's
end-of-text token, SDXL's second encoder's projection; `DiffusionEngine.prompt_vectors`),
on the engine that would otherwise make the image, so a hit costs one text-encoder call
instead of a denoising loop. "Every other parameter" is the result cache's key with the
prompt left out (weights, negative prompt, seed, size, steps, scheduler, guidance, speed
tier, LoRA and its scale): its group. The nearest prompt of the group by cosine
similarity at or above the threshold wins; the metadata row says `cache_hit` with the
source entry (`cache_source`) and the similarity (`cache_similarity`).

Index entries sit next to the result cache's, one small object per made image:

    <cache prefix>/semantic/<gg>/<group>/<entry key>.json   {prompt, vector (float16, base64)}

written by the write path with the image's entry. A group's index is read whole at each
lookup (one listing and a read per entry): fine for the tens to thousands of variants a
scene gets, not meant for a million prompts in one group.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from typing import Any

from .result_cache import CacheView
from .schema import GeneratedImage, ImageRequest
from .storage import Storage

logger = logging.getLogger(__name__)

SEMANTIC = "semantic"


def group_key(view: CacheView, request: ImageRequest, width: int, height: int) -> str | None:
    """The group of `request`: its result-cache key (as `view` salts it) without the prompt."""
    return view.key(request.model_copy(update={"prompt": ""}), width, height)


def _folder(group: str) -> str:
    return f"{SEMANTIC}/{group[:2]}/{group}"


@dataclass(frozen=True)
class Match:
    """The nearest stored prompt of a group."""

    key: str  # the result-cache entry of its image
    prompt: str
    similarity: float


@dataclass(frozen=True)
class SemanticIndex:
    """The semantic index under a result cache's prefix, and the threshold a hit needs."""

    storage: Storage
    threshold: float

    def entries(self, group: str) -> list[dict[str, Any]]:
        """Every indexed prompt of `group` (none when it has no folder yet)."""
        try:
            paths = self.storage.fs.ls(self.storage.path(_folder(group)), detail=False)
        except FileNotFoundError:
            return []
        out = []
        for path in sorted(p for p in paths if p.endswith(".json")):
            try:
                out.append(json.loads(self.storage.fs.cat_file(path)))
            except (OSError, ValueError):  # vanished or half-copied: not a match
                continue
        return out

    def nearest(self, group: str, vector: Any, entries: list[dict] | None = None) -> Match | None:
        """The stored prompt of `group` (its `entries`, read here when not given) most
        similar to the unit `vector`, if it reaches the threshold."""
        import numpy as np

        best = None
        for entry in self.entries(group) if entries is None else entries:
            stored = np.frombuffer(base64.b64decode(entry["vector"]), dtype=np.float16)
            if stored.shape != vector.shape:
                continue  # another encoder's vector
            similarity = float(np.dot(stored.astype(np.float32), vector.astype(np.float32)))
            if similarity >= self.threshold and (best is None or similarity > best.similarity):
                best = Match(entry["key"], entry["prompt"], round(similarity, 6))
        return best

    def add(self, group: str, key: str, prompt: str, vector: Any) -> None:
        """Index the image `key` (made for `prompt`, embedded as `vector`) in `group`."""
        import numpy as np

        data = {"key": key, "prompt": prompt,
                "vector": base64.b64encode(np.asarray(vector, np.float16).tobytes()).decode()}  # fmt: skip
        self.storage.write_bytes(f"{_folder(group)}/{key}.json", json.dumps(data).encode())


def semantic_index(cache: Storage | None, config: Any) -> SemanticIndex | None:
    """The semantic index a job or deployment with `cache:` `config` uses, or None (off)."""
    if cache is None or config.semantic_threshold is None:
        return None
    return SemanticIndex(cache, config.semantic_threshold)


def semantic_hits(index: SemanticIndex, engine: Any, requests: list[ImageRequest],
                  quality: Any = None) -> tuple:  # fmt: skip
    """(hits, vectors): per position of `requests` whose prompt has a near-duplicate, the
    stored image as that request's (GeneratedImage with cache_source and cache_similarity,
    and the provenance of what made it); and every request's prompt vector (the write path
    indexes the images made). `quality`: the gate this engine applies (it salts the keys).
    Best effort: an index that cannot be read is a miss."""
    import dataclasses

    from .result_cache import load

    vectors = engine.prompt_vectors([r.prompt for r in requests])
    config, side = engine.config, engine.model.default_size
    view = CacheView(index.storage, engine.model.weights_hash, config.quantize.value,
                     config.noise_on_device, quality)  # fmt: skip
    hits: dict[int, tuple[GeneratedImage, dict]] = {}
    read: dict[str, list[dict]] = {}  # group -> its entries, listed once per call
    for i, (request, vector) in enumerate(zip(requests, vectors, strict=True)):
        try:
            group = group_key(view, request, *request.resolved_size(side))
            if group is not None and group not in read:
                read[group] = index.entries(group)
            match = None if group is None else index.nearest(group, vector, read[group])
            if match is None:
                continue
            generated, made = load(index.storage, match.key, request)
        except Exception as exc:  # the index or the entry unreadable: make the image
            logger.warning("semantic cache %s: %s; treated as a miss", index.storage, exc)
            continue
        hits[i] = (dataclasses.replace(generated, cache_similarity=match.similarity),
                   made["provenance"])  # fmt: skip
    return hits, vectors
