"""The quality gate: images that should not reach a catalogue, caught after decode.

Runs in the engine's thread right after each engine call, for the batch job's actors and
the Serve replicas alike (`quality:` in the job or serve config). An image is rejected
when it is near-uniform (blank, or a NaN decode, which comes out one colour), mostly
clipped to pure black or white, under `min_side`, or refused by a user classifier
(`module:function` or `path/to/file.py:function`, called as `fn(pixels, request)` and
answering None/True to accept, False or a reason to reject; one that raises rejects that
image with the error, never its batch). With `regenerate: N` a
rejected image is made again with a derived seed (deterministic: attempt k of seed s is
`derived_seed(s, k)`, the one recorded) up to N times; one still rejected becomes a
`Rejected` result: an errors-table row (stage `quality`) in a job, a 422 online. A
rejected image is never written to `images/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .schema import SEED_LIMIT, GeneratedImage, ImageRequest


class QualityConfig(BaseModel):
    """The quality gate's thresholds (`quality:` in a job or serve config)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Check every image after decode.")
    min_std: float = Field(
        2.0, ge=0, description="Reject images whose grey-level standard deviation (0-255) is "
        "below this: blank or near-uniform (a NaN decode comes out one colour).",
    )  # fmt: skip
    max_clipped_fraction: float = Field(
        0.5, gt=0, le=1, description="Reject images with more than this fraction of pixels "
        "pure black or pure white.",
    )  # fmt: skip
    min_side: int | None = Field(None, ge=1, description="Reject images narrower or lower.")
    classifier: str | None = Field(
        None, description="`module:function` or `file.py:function`: fn(pixels, request) -> "
        "None/True (accept), False or a reason (reject).",
    )  # fmt: skip
    regenerate: int = Field(0, ge=0, le=5, description="Derived-seed retries of a rejected image.")
    keep_rejected: bool = Field(
        False, description="Keep each rejected image (its last attempt) as rejected/<id>.png, "
        "named by its errors row (`uri`), for review; it never reaches images/.",
    )  # fmt: skip


class Rejected(Exception):
    """An image the gate refused after every attempt; the message is the reason, `image`
    the last attempt (kept under rejected/ with keep_rejected)."""

    def __init__(self, reason: str, image: GeneratedImage | None = None):
        super().__init__(reason)
        self.image = image  # in __dict__: it survives pickling across Ray


def derived_seed(seed: int, attempt: int) -> int:
    """The seed of regeneration `attempt` (1, 2, ...) of an image first made with `seed`."""
    digest = hashlib.sha256(f"{seed}:regenerate:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_LIMIT


def load_classifier(spec: str) -> Callable[[Any, ImageRequest], Any]:
    """The callable `spec` names; ValueError with one line when it cannot be loaded."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError(f"quality.classifier: {spec!r} is not module:function or file.py:function")
    try:
        if target.endswith(".py"):
            found = importlib.util.spec_from_file_location("daguerre_user_classifier", target)
            if found is None or found.loader is None:
                raise ImportError(f"no such file {target}")
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        function = getattr(module, name)
    except Exception as exc:  # ImportError, SyntaxError, AttributeError, FileNotFoundError...
        raise ValueError(f"quality.classifier: cannot load {spec!r} "
                         f"({type(exc).__name__}: {exc})") from None  # fmt: skip
    if not callable(function):
        raise ValueError(f"quality.classifier: {spec!r} is not callable")
    return function


def check_quality(config: QualityConfig) -> None:
    """Load the classifier once before any actor starts: ConfigError naming the field."""
    from .config import ConfigError

    if config.enabled and config.classifier:
        try:
            load_classifier(config.classifier)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


class QualityGate:
    """The gate of one engine: its thresholds and loaded classifier."""

    def __init__(self, config: QualityConfig):
        self.config = config
        self.classifier = load_classifier(config.classifier) if config.classifier else None

    def reason(self, image: GeneratedImage) -> str | None:
        """Why `image` is rejected, or None."""
        import numpy as np

        pixels = image.image
        low = self.config.min_side
        if low is not None and min(image.width, image.height) < low:
            return f"{image.width}x{image.height} is under min_side {low}"
        grey = pixels.astype(np.float32).mean(axis=2)
        if float(grey.std()) < self.config.min_std:
            return f"near-uniform: grey-level std {grey.std():.2f} < {self.config.min_std}"
        clipped = float(((pixels == 0).all(axis=2) | (pixels == 255).all(axis=2)).mean())
        if clipped > self.config.max_clipped_fraction:
            return (f"clipped: {clipped:.0%} of pixels pure black or white "
                    f"(> {self.config.max_clipped_fraction:.0%})")  # fmt: skip
        if self.classifier is not None:
            try:
                verdict = self.classifier(pixels, image.request)
            except Exception as exc:  # a broken check rejects its image, never the batch
                return f"classifier failed: {type(exc).__name__}: {exc}"
            if verdict is False or isinstance(verdict, str):
                return f"classifier: {verdict if isinstance(verdict, str) else 'rejected'}"
        return None

    def run(self, generate: Callable[[list[ImageRequest], list[int]], list[Any]],
            requests: list[ImageRequest], results: list[Any]) -> list[Any]:  # fmt: skip
        """`results` with every rejected image regenerated (derived seeds, in batches of the
        rejected ones) up to `regenerate` times, then replaced by Rejected. `generate` takes
        the retries and their positions in `requests`."""
        results = list(results)
        reasons = {
            i: self.reason(r) for i, r in enumerate(results) if isinstance(r, GeneratedImage)
        }
        for attempt in range(1, self.config.regenerate + 1):
            again = [i for i, why in reasons.items() if why]
            if not again:
                break
            retries = [requests[i].model_copy(update={"seed": derived_seed(
                requests[i].resolved_seed, attempt)}) for i in again]  # fmt: skip
            for i, result in zip(again, generate(retries, again), strict=True):
                if isinstance(result, GeneratedImage):  # judged as made; kept as asked
                    reasons[i] = self.reason(result)
                    results[i] = dataclasses.replace(result, request=requests[i])
        for i, why in reasons.items():
            if why:
                tries = (
                    f" after {self.config.regenerate} regenerations"
                    if self.config.regenerate
                    else ""
                )
                last = results[i] if isinstance(results[i], GeneratedImage) else None
                results[i] = Rejected(f"{why}{tries}", last)
        return results
