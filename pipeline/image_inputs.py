"""Images in (img2img, inpainting): what the engine takes beside a request, where the loop
starts, and how a mask keeps what it keeps.

An init image enters the denoising loop part way (UNet models, SD3 and FLUX alike): `strength` (0 < strength <= 1) decides
how many of the request's steps run, int(steps * strength) as diffusers counts them, and the
image's latents are noised to the first of those steps. The engine takes the pixels already
at the request's size (reading, decoding and resizing are CPU work done before it, as
PNG encoding is after it), encodes them with the VAE (each sampled from the VAE's
posterior with its request's own generator, so an image does not depend on its batch),
and runs the remaining steps in the same hot path as text-only requests.

With a mask on an ordinary 4-channel UNet (diffusers' masked latent blending) the region
the mask keeps (black) is put back after every step: the init image's latents noised to
the next step (to none after the last), so the loop only paints where the mask is white.
An inpainting UNet (9 input channels, sd-v1-5-inpainting) instead takes the mask and the
masked image's latents beside the latents at every step, and blends nothing. A strength
of 1 starts either loop from pure noise, as diffusers' does.

The engine takes them through `DiffusionEngine.generate(requests, images)`; reading them
from a request's URI or upload is pipeline/image_reads.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import RequestRefused


@dataclass(frozen=True)
class ImageInput:
    """One request's init image: uint8 pixels [H, W, 3] at the request's size, and how far
    from it the result may go."""

    pixels: Any  # np.ndarray [H, W, 3] uint8
    strength: float = 0.8
    mask: Any = None  # np.ndarray [H, W] uint8: white (>= 128) is painted, black kept
    provenance: dict[str, Any] | None = None  # for the metadata row (pipeline/image_reads.py)

    def __post_init__(self) -> None:
        if not 0 < self.strength <= 1:  # NaN fails both
            raise ValueError(f"strength: {self.strength} is out of range; use 0 < strength <= 1")
        shape = getattr(self.pixels, "shape", None)
        if shape is None or len(shape) != 3 or shape[2] != 3 or str(self.pixels.dtype) != "uint8":
            raise ValueError(f"init image: pixels must be uint8 [H, W, 3], not {shape}")
        if self.mask is not None:
            mask_shape = getattr(self.mask, "shape", None)
            if mask_shape != shape[:2] or str(self.mask.dtype) != "uint8":
                raise ValueError(f"mask: must be uint8 [H, W] as the image's {shape[:2]}, "
                                 f"not {mask_shape}")  # fmt: skip

    @property
    def kind(self) -> str:
        return "img2img" if self.mask is None else "inpaint"


def start_step(steps: int, strength: float) -> int:
    """The step an init image enters a loop of `steps` at (steps run: int(steps * strength))."""
    return steps - min(int(steps * strength), steps)


def is_inpainting_unet(model: Any) -> bool:
    """A UNet trained for inpainting (sd-v1-5-inpainting's 9 input channels: the latents,
    the mask, the masked image's latents)."""
    return model.family == "unet" and model.unet.config.in_channels == 9


def image_refusal(image: ImageInput | None, steps: int, width: int, height: int,
                  model: Any) -> RequestRefused | None:  # fmt: skip
    """Why an engine of `model` cannot start this init image's loop (None: it can); an
    inpainting UNet takes nothing but inpainting."""
    if image is None or image.mask is None:
        if is_inpainting_unet(model):
            return RequestRefused("mask_image", (
                f"{model.name} is an inpainting UNet (9 input channels): every request needs "
                "init_image and mask_image"
            ))  # fmt: skip
        if image is None:
            return None
    if model.family != "unet" and image.mask is not None:
        return RequestRefused("mask_image", (
            f"inpainting runs on UNet models so far; {model.name} is a {model.family} "
            "transformer (img2img without a mask runs on it)"
        ))  # fmt: skip
    if image.pixels.shape[:2] != (height, width):
        return RequestRefused("init_image", (
            f"{image.pixels.shape[1]}x{image.pixels.shape[0]} pixels for a {width}x{height} "
            "image; resize it to the request's size first"
        ))  # fmt: skip
    channels = model.unet.config.in_channels if model.family == "unet" else 0
    if image.mask is not None and channels not in (4, 9):
        return RequestRefused("mask_image", (
            f"{model.name}'s UNet takes {channels} channels; inpainting runs on 4-channel UNets "
            "(masked latent blending) and 9-channel inpainting UNets"
        ))  # fmt: skip
    if start_step(steps, image.strength) == steps:
        return RequestRefused("strength", (
            f"{image.strength} of {steps} steps runs no step; use strength >= {1 / steps:.3g} "
            "or more steps"
        ))  # fmt: skip
    return None


def noised_start(scheduler: Any, start: int, image_latents: Any, noise: Any) -> tuple[Any, Any]:
    """(the timesteps left from `start` on, the init latents noised to the first of them), the
    scheduler told where it begins (stateful schedulers count their steps)."""
    begin = start * scheduler.order
    timesteps = scheduler.timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    first = timesteps[:1].repeat(noise.shape[0])
    if hasattr(scheduler, "scale_noise"):  # flow matching (SD3, FLUX): (1 - s) x + s noise
        return timesteps, scheduler.scale_noise(image_latents, first, noise)
    return timesteps, scheduler.add_noise(image_latents, noise, first)


class MaskedBlend:
    """Inpainting on an ordinary UNet: after step `index`, the kept region (mask 0) is the
    init latents noised to the next timestep (the init latents themselves after the last),
    the painted region (mask 1) what the loop made. As diffusers' inpainting pipeline for
    4-channel UNets; every row has its own mask, latents and noise."""

    def __init__(self, scheduler: Any, timesteps: Any, image_latents: Any, noise: Any,
                 masks: Any):  # fmt: skip
        import torch.nn.functional as F

        self.scheduler, self.timesteps = scheduler, timesteps
        self.image_latents, self.noise = image_latents, noise
        # [B, H, W] uint8 -> binary [B, 1, h, w] at the latents' size (nearest, as diffusers)
        binary = (masks.float() / 255 >= 0.5).float()[:, None]
        self.mask = F.interpolate(binary, size=image_latents.shape[-2:]).to(image_latents.dtype)

    def __call__(self, index: int, latents: Any) -> Any:
        kept = self.image_latents
        if index < len(self.timesteps) - 1:
            kept = self.scheduler.add_noise(kept, self.noise, self.timesteps[index + 1 : index + 2])
        return (1 - self.mask) * kept + self.mask * latents


class LoopStart:
    """Where one chunk's denoising loop starts: from noise (entry None), or from its init
    images (entry: (img2img or inpaint, the start step)), drawing from each request's
    generator in diffusers' order: the image's posterior, the noise, the masked image's."""

    def __init__(self, entry: tuple | None, images: list, denoiser: Any, model: Any):
        import numpy as np

        self.entry, self.images, self.denoiser = entry, images, denoiser
        self.nine = entry is not None and entry[0] == "inpaint" and is_inpainting_unet(model)
        self.pixels = None if entry is None else np.stack([i.pixels for i in images])
        self.init: Any = None  # the init images' latents (packed as the noise is)

    def encode(self, generators: list) -> None:
        """Before the noise: the init images' latents (a 9-channel UNet from noise never
        encodes the image itself)."""
        if self.entry is not None and not (self.nine and self.entry[1] == 0):
            self.init = self.denoiser.pack(self.denoiser.encode_images(self.pixels, generators))

    def condition(self, cond: Any, generators: list, latent_h: int, latent_w: int) -> None:
        """After the noise: a 9-channel UNet's mask and masked-image latents in `cond`; a
        4-channel UNet's inpainting skips that draw (diffusers makes it, never uses it)."""
        import numpy as np

        if self.nine:
            masks = np.stack([i.mask for i in self.images])
            cond.extra["inpaint"] = self.denoiser.inpaint_channels(self.pixels, masks, generators,
                                                                   latent_h, latent_w)  # fmt: skip
        elif self.entry is not None and self.entry[0] == "inpaint":
            self.denoiser.skip_posterior_draw(generators, latent_h, latent_w)

    def loop(self, scheduler: Any, noise: Any) -> tuple[Any, Any, MaskedBlend | None]:
        """(the timesteps to run, the first latents, the blend after each step or None)."""
        import numpy as np
        import torch

        latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching: none
        if self.entry is None:
            return scheduler.timesteps, latents, None
        kind, start = self.entry
        image = noise if self.init is None else self.init
        timesteps, noised = noised_start(scheduler, start, image, noise)
        if kind == "img2img" or start > 0:  # inpainting at strength 1 starts from noise
            latents = noised
        blend = None
        if kind == "inpaint" and not self.nine:
            masks = torch.from_numpy(np.stack([i.mask for i in self.images])).to(noise.device)
            blend = MaskedBlend(scheduler, timesteps, self.init, noise, masks)
        return timesteps, latents, blend
