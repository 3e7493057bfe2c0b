"""Images in (img2img): what the engine takes beside a request, and where the loop starts.

An init image enters the denoising loop part way: `strength` (0 < strength <= 1) decides
how many of the request's steps run, int(steps * strength) as diffusers counts them, and the
image's latents are noised to the first of those steps. The engine takes the pixels already
at the request's size (reading, decoding and resizing are CPU work done before it, as
PNG encoding is after it), encodes them with the VAE (each sampled from the VAE's
posterior with its request's own generator, so an image does not depend on its batch),
and runs the remaining steps in the same hot path as text-only requests.

Here the engine takes them through `DiffusionEngine.generate(requests, images)`; the
manifest, the job and the HTTP fronts do not pass init images yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ImageInput:
    """One request's init image: uint8 pixels [H, W, 3] at the request's size, and how far
    from it the result may go."""

    pixels: Any  # np.ndarray [H, W, 3] uint8
    strength: float = 0.8

    def __post_init__(self) -> None:
        if not 0 < self.strength <= 1:  # NaN fails both
            raise ValueError(f"strength: {self.strength} is out of range; use 0 < strength <= 1")
        shape = getattr(self.pixels, "shape", None)
        if shape is None or len(shape) != 3 or shape[2] != 3 or str(self.pixels.dtype) != "uint8":
            raise ValueError(f"init image: pixels must be uint8 [H, W, 3], not {shape}")


def start_step(steps: int, strength: float) -> int:
    """The step an init image enters a loop of `steps` at (steps run: int(steps * strength))."""
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ValueError(
            f"strength: {strength} of {steps} steps runs no step; use strength >= {1 / steps:.3g} "
            "or more steps"
        )
    return steps - run


def noised_start(scheduler: Any, start: int, image_latents: Any, noise: Any) -> tuple[Any, Any]:
    """(the timesteps left from `start` on, the init latents noised to the first of them), the
    scheduler told where it begins (stateful schedulers count their steps)."""
    begin = start * scheduler.order
    timesteps = scheduler.timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    first = timesteps[:1].repeat(noise.shape[0])
    return timesteps, scheduler.add_noise(image_latents, noise, first)
