"""The denoiser seam: what differs between model families, behind one small interface.

`DiffusionEngine.generate` keeps one hot path (buckets, per-request generators, the
denoising loop, VAE decode, timings, provenance) and asks its `Denoiser` for the rest:

    prompts(requests)                 which prompts to encode ([negatives, prompts] with CFG)
    encode(prompts)                   per-prompt text rows (tokens [S, D], pooled [P] | None)
    conditioning(...)                 the stacked rows plus family extras (SDXL time ids,
                                      FLUX position ids and guidance vector)
    noise_shape(h, w)                 one request's unpacked latent noise: drawn per request
    encode_images(pixels, generators) init images (img2img, inpainting) as latents
    pack(x) / to_vae(x, h, w)         latent packing (FLUX 2x2) and the VAE's latent scale
    scheduler(name, steps, w, h)      the family's scheduler, timesteps set
    loop(cached)                      around one denoising loop (step caching on or off)
    predict(sched, x, t, cond, i)     the model output for the batch at step i (CFG inside)
    refusal(request)                  why one request cannot run here (a per-row error)

Three families: `unet` (SD 1.x/2.x, SDXL: this file), `sd3` and `flux` (pipeline/dit.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import RequestRefused
from .models import ModelComponents
from .schema import ImageRequest, Scheduler
from .tokenizer import TEXT_MAX_LENGTH

TextRow = tuple[torch.Tensor, "torch.Tensor | None"]  # (tokens [S, D], pooled [P] or None)


@dataclass
class Conditioning:
    """One chunk's conditioning, in the order `prompts` gave."""

    embeds: torch.Tensor  # [N, S, D]
    pooled: torch.Tensor | None  # [N, P]
    guidance: torch.Tensor  # CFG: [B, 1, 1, 1] weights; FLUX: [B] guidance embedding input
    extra: dict[str, Any] = field(default_factory=dict)


class Denoiser:
    """The family-independent half: text ids, the prompt split, per-request refusals."""

    family = "unet"
    cfg = True  # the batch runs [negatives, prompts] through one call, guidance mixes them
    schedulers: tuple[str, ...] = tuple(s.value for s in Scheduler)

    def __init__(self, model: ModelComponents, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype
        self.factor = model.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (the VAE's factor times any patching)."""
        return self.factor

    def refusal(self, request: ImageRequest, width: int, height: int) -> RequestRefused | None:
        """Why this family cannot make `request` (None: it can)."""
        if request.scheduler.value not in self.schedulers:
            return RequestRefused("scheduler", (
                f"{request.scheduler.value} does not fit {self.model.name} (a {self.family} "
                f"model, flow matching); use {', '.join(self.schedulers)}"
            ))  # fmt: skip
        multiple = self.size_multiple
        if width % multiple or height % multiple:
            return RequestRefused("size", (
                f"{width}x{height}: {self.model.name} ({self.family}) needs width and height "
                f"in multiples of {multiple}"
            ))  # fmt: skip
        return None

    def prompts(self, requests: list[ImageRequest]) -> list[str]:
        if not self.cfg:
            return [r.prompt for r in requests]
        return [r.negative_prompt for r in requests] + [r.prompt for r in requests]

    def ids(self, tokenizer: Any, prompts: list[str], length: int = TEXT_MAX_LENGTH) -> Any:
        tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                           return_tensors="pt")  # fmt: skip
        return tokens.input_ids.to(self.device)

    def noise_shape(self, latent_h: int, latent_w: int) -> tuple[int, int, int]:
        return (self.model.vae.config.latent_channels, latent_h, latent_w)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def encode_images(self, pixels: Any, generators: list[torch.Generator]) -> torch.Tensor:
        """Init images uint8 [B, H, W, 3] -> latents [B, C, h, w] as a loop starts from: each
        sampled from the VAE's posterior with its request's generator (first, as diffusers
        draws), then (x - shift_factor) * scaling_factor, what `to_vae` undoes."""
        images = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        return self._sample_latents(images, generators)

    def _sample_latents(
        self, images: torch.Tensor, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents sampled from the VAE's posterior."""
        vae, config = self.model.vae, self.model.vae.config
        posterior = vae.encode(images.to(vae.dtype)).latent_dist
        mean, std = posterior.mean, posterior.std
        draws = [torch.randn((1, *mean.shape[1:]), generator=g, device=g.device, dtype=mean.dtype)
                 for g in generators]  # fmt: skip
        samples = mean + std * torch.cat(draws).to(mean.device)
        shift = getattr(config, "shift_factor", None) or 0.0
        return ((samples - shift) * config.scaling_factor).to(self.dtype)

    def inpaint_channels(self, pixels: Any, masks: Any, generators: list[torch.Generator],
                         latent_h: int, latent_w: int) -> torch.Tensor:  # fmt: skip
        """What a 9-channel inpainting UNet takes beside the latents, [2B, 5, h, w] for both
        CFG halves: the mask at the latents' size, then the masked image's latents (the
        image with its painted region set to grey, sampled with each request's generator:
        diffusers' draw after the noise)."""
        import torch.nn.functional as F

        images = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        painted = torch.from_numpy(masks).to(self.device).float()[:, None] / 255 >= 0.5
        masked = self._sample_latents(images * ~painted, generators)
        mask = F.interpolate(painted.float(), size=(latent_h, latent_w)).to(masked.dtype)
        extra = torch.cat([mask, masked], dim=1)
        return torch.cat([extra, extra])

    def skip_posterior_draw(self, generators: list[torch.Generator], latent_h: int,
                            latent_w: int) -> None:  # fmt: skip
        """Advance each generator past one posterior-sized draw, as diffusers' inpainting
        spends one on the masked image (4-channel UNets never use it), so an ancestral
        sampler's per-step noise is diffusers' too."""
        shape = (1, self.model.vae.config.latent_channels, latent_h, latent_w)
        for g in generators:
            torch.randn(shape, generator=g, device=g.device)

    def to_vae(self, latents: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
        """Latents as the VAE decodes them: / scaling_factor (+ shift_factor where it has one)."""
        config = self.model.vae.config
        latents = latents.to(self.model.vae.dtype) / config.scaling_factor
        shift = getattr(config, "shift_factor", None)
        return latents + shift if shift else latents

    @contextmanager
    def loop(self, cached: bool) -> Iterator[None]:
        """Around one denoising loop (`cached`: this chunk's speed tier is cached)."""
        try:
            self.begin(cached)
            yield
        finally:
            self.end()

    def begin(self, cached: bool) -> None:
        """A denoising loop starts."""

    def end(self) -> None:
        """The loop is over (or failed): nothing it set up stays on the model."""

    def mu(self, width: int, height: int) -> float | None:
        """The resolution-dependent timestep shift (None where the model's shift is static)."""
        return None

    def describe(self) -> str:
        return self.family

    def prompt_vectors(self, prompts: list[str]) -> torch.Tensor:
        """Pooled text vectors [N, D] from the first CLIP (what the semantic cache compares)."""
        return self.model.text_encoder(self.ids(self.model.tokenizer, prompts)).pooler_output


class UnetDenoiser(Denoiser):
    """SD 1.x/2.x and SDXL: a UNet through its backend runner (kernels/compile.py), CFG in
    one call, DeepCache for speed: cached, LoRA routed by the engine."""

    def __init__(self, model: ModelComponents, device: torch.device, dtype: torch.dtype,
                 runner: Any, cache_interval: int):  # fmt: skip
        super().__init__(model, device, dtype)
        self.runner, self.cache_interval = runner, cache_interval
        self._deep_cache: Any = None  # kernels/deep_cache.py, made at the first cached loop
        self.cached = False

    def encode(self, prompts: list[str]) -> list[TextRow]:
        model = self.model
        if not model.is_sdxl:
            hidden = model.text_encoder(self.ids(model.tokenizer, prompts))[0]  # [N, 77, D]
            return [(h, None) for h in hidden]
        # SDXL: both encoders' penultimate hidden states side by side; pooled from the second.
        out_1 = model.text_encoder(self.ids(model.tokenizer, prompts), output_hidden_states=True)
        out_2 = model.text_encoder_2(self.ids(model.tokenizer_2, prompts),
                                     output_hidden_states=True)  # fmt: skip
        hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return list(zip(hidden, out_2.text_embeds, strict=True))

    def conditioning(self, embeds: torch.Tensor, pooled: torch.Tensor | None,
                     requests: list[ImageRequest], width: int, height: int) -> Conditioning:  # fmt: skip
        batch = len(requests)
        if self.model.force_zeros_for_empty_prompt:  # as diffusers' SDXL: no negative -> zeros
            empty = torch.tensor([not r.negative_prompt for r in requests] + [False] * batch)
            embeds[empty.to(self.device)] = 0
            pooled[empty.to(self.device)] = 0
        extra: dict[str, Any] = {"added_cond": None}
        if self.model.is_sdxl:
            # SDXL's micro-conditioning: original size, crop top-left, target size.
            time_ids = torch.tensor(
                [[height, width, 0, 0, height, width]], device=self.device, dtype=self.dtype
            )
            extra["added_cond"] = {"text_embeds": pooled, "time_ids": time_ids.repeat(2 * batch, 1)}
        guidance = torch.tensor([r.guidance_scale for r in requests], device=self.device,
                                dtype=self.dtype).view(batch, 1, 1, 1)  # fmt: skip
        return Conditioning(embeds, pooled, guidance, extra)

    def scheduler(self, name: str, steps: int, width: int, height: int) -> Any:
        scheduler = unet_scheduler(name, self.model.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def predict(self, scheduler: Any, latents: torch.Tensor, t: Any, cond: Conditioning,
                index: int) -> torch.Tensor:  # fmt: skip
        latent_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)  # [2B, ...]
        if "inpaint" in cond.extra:  # a 9-channel inpainting UNet: + mask, masked image
            latent_in = torch.cat([latent_in, cond.extra["inpaint"]], dim=1)
        added = cond.extra["added_cond"]
        if self.cached:
            noise = self.step_cache()(index, latent_in, t, cond.embeds, added)
        else:
            noise = self.runner(latent_in, t, cond.embeds, added)
        noise_uncond, noise_cond = noise.chunk(2)
        return noise_uncond + cond.guidance * (noise_cond - noise_uncond)

    def begin(self, cached: bool) -> None:
        self.cached = cached
        if cached:
            self.step_cache().reset()

    def step_cache(self) -> Any:
        """The step-caching runner over the eager UNet (made once)."""
        from ..kernels.deep_cache import DeepCacheUNet

        if self._deep_cache is None:
            self._deep_cache = DeepCacheUNet(self.model.unet, self.cache_interval)
        return self._deep_cache

    def prompt_vectors(self, prompts: list[str]) -> torch.Tensor:
        if self.model.is_sdxl:  # the second encoder's projection, as SDXL pools
            return self.model.text_encoder_2(self.ids(self.model.tokenizer_2, prompts)).text_embeds
        return super().prompt_vectors(prompts)


def unet_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """A fresh diffusers scheduler for a UNet model (one per chunk: schedulers are stateful)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    kind = Scheduler(name)
    if kind is Scheduler.ddim:
        return DDIMScheduler.from_config(base_config)
    if kind is Scheduler.euler:
        return EulerDiscreteScheduler.from_config(base_config)
    if kind is Scheduler.euler_a:
        return EulerAncestralDiscreteScheduler.from_config(base_config)
    return DPMSolverMultistepScheduler.from_config(
        base_config, algorithm_type="dpmsolver++", solver_order=2
    )
