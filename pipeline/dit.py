"""The transformer families behind the denoiser seam (pipeline/denoisers.py): SD3/SD3.5
(MMDiT, CFG, three text encoders) and FLUX.1 (double/single-stream blocks, packed 2x2
latents, guidance-distilled: no CFG, no negative prompt), both flow matching.

Every op in both transformers is per row (per-sample attention, per-token norms, adaLN
from each row's own timestep embedding), so an image does not depend on its batch-mates:
the engine draws each request's noise unpacked from its own generator and packs it after,
as diffusers' pipelines do, so a seed gives diffusers' image.

Schedulers (the request's `scheduler`): euler is flow-matching Euler with the model's
timestep shift (static for SD3 and FLUX.1-schnell; resolution-dependent, from the image
token count, for FLUX.1-dev), euler_a the same with fresh per-request noise at each step,
dpmpp_2m DPM-Solver++ on flow sigmas with that shift. ddim has no flow form: a per-row error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import RequestRefused
from .denoisers import Conditioning, Denoiser, TextRow
from .schema import ImageRequest, Scheduler

FLOW_SCHEDULERS = (Scheduler.euler.value, Scheduler.euler_a.value, Scheduler.dpmpp_2m.value)


class FlowDenoiser(Denoiser):
    """What SD3 and FLUX share: flow schedulers, the transformer through its backend runner
    (kernels/transformer.py), step caching (diffusers' TaylorSeer hooks, kernels/dit_cache.py)
    for speed: cached, on the eager transformer whatever the backend."""

    schedulers = FLOW_SCHEDULERS
    patch = 2  # latent pixels per token side (SD3's patch embedding, FLUX's packing)

    def __init__(self, model: Any, device: torch.device, dtype: torch.dtype, runner: Any,
                 cache_interval: int = 3):  # fmt: skip
        from ..kernels.dit_cache import TaylorSeerSteps

        super().__init__(model, device, dtype)
        self.transformer, self.runner = model.transformer, runner
        self.step_cache = TaylorSeerSteps(self.transformer, cache_interval)
        self.cached = False

    @property
    def size_multiple(self) -> int:
        return self.factor * self.patch

    def begin(self, cached: bool) -> None:
        self.cached = cached
        if cached:
            self.step_cache.on()

    def end(self) -> None:
        self.step_cache.off()  # other users of the module (engines, FLOP counts) see it bare
        self.cached = False

    def t5_rows(self, encoder: Any, tokenizer: Any, prompts: list[str], width: int) -> Any:
        """T5's last hidden state [N, L, width] (zeros where the model has no T5, as SD3 allows)."""
        length = self.model.text_max_length
        if encoder is None:
            return torch.zeros(len(prompts), length, width, device=self.device, dtype=self.dtype)
        return encoder(self.ids(tokenizer, prompts, length))[0].to(self.dtype)

    def scheduler(self, name: str, steps: int, width: int, height: int) -> Any:
        return flow_scheduler(name, self.model.scheduler_config, steps, self.device,
                              self.sigmas(steps), self.mu(width, height))  # fmt: skip

    def sigmas(self, steps: int) -> Any:
        """The unshifted sigmas (None: the scheduler's own spacing, as SD3's pipeline leaves it)."""
        return None

    def run(self, hidden: torch.Tensor, timestep: Any, kwargs: dict) -> torch.Tensor:
        inputs = {"hidden_states": hidden, "timestep": timestep, **kwargs}
        if self.cached:  # the TaylorSeer hooks act on the eager module's calls
            return self.transformer(**inputs, return_dict=False)[0]
        return self.runner(inputs)

    def image_tokens(self, width: int, height: int) -> int:
        side = self.factor * self.patch
        return (width // side) * (height // side)

    def forward_inputs(self, batch: int, width: int, height: int) -> dict[str, Any]:
        """Zero inputs of one transformer call on `batch` rows (FLOP counts, export)."""
        zeros = lambda *shape: torch.zeros(*shape, device=self.device, dtype=self.dtype)  # noqa: E731
        config = self.transformer.config
        text = self.model.text_max_length + (0 if self.family == "flux" else 77)
        inputs = {
            "timestep": zeros(batch),
            "encoder_hidden_states": zeros(batch, text, config.joint_attention_dim),
            "pooled_projections": zeros(batch, config.pooled_projection_dim),
        }
        latent_h, latent_w = height // self.factor, width // self.factor
        if self.family == "sd3":
            return {"hidden_states": zeros(batch, config.in_channels, latent_h, latent_w), **inputs}
        tokens = self.image_tokens(width, height)
        return {"hidden_states": zeros(batch, tokens, config.in_channels), **inputs,
                "guidance": zeros(batch) if config.guidance_embeds else None,
                "txt_ids": zeros(text, 3), "img_ids": zeros(tokens, 3)}  # fmt: skip


class Sd3Denoiser(FlowDenoiser):
    """SD3 / SD3.5: CLIP-L and CLIP-G penultimate states (zero-padded to T5's width) then
    T5's tokens as one sequence, both CLIPs' projections as the pooled vector; CFG with the
    negative prompt encoded (an empty one too, not zeroed, as diffusers does)."""

    family = "sd3"

    def refusal(self, request: ImageRequest, width: int, height: int) -> RequestRefused | None:
        refused = super().refusal(request, width, height)
        limit = self.transformer.config.pos_embed_max_size
        if refused is None and limit and max(width, height) > limit * self.patch * self.factor:
            side = limit * self.patch * self.factor
            return RequestRefused("size", (f"{width}x{height}: {self.model.name} makes images "
                                           f"up to {side} px a side (its position embedding)"))  # fmt: skip
        return refused

    def encode(self, prompts: list[str]) -> list[TextRow]:
        m = self.model
        out_1 = m.text_encoder(self.ids(m.tokenizer, prompts), output_hidden_states=True)
        out_2 = m.text_encoder_2(self.ids(m.tokenizer_2, prompts), output_hidden_states=True)
        clip = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        width = self.transformer.config.joint_attention_dim
        t5 = self.t5_rows(m.text_encoder_3, m.tokenizer_3, prompts, width)
        tokens = torch.cat([F.pad(clip, (0, width - clip.shape[-1])), t5], dim=-2)
        pooled = torch.cat([out_1.text_embeds, out_2.text_embeds], dim=-1)
        return list(zip(tokens, pooled, strict=True))

    def conditioning(self, embeds: torch.Tensor, pooled: torch.Tensor | None,
                     requests: list[ImageRequest], width: int, height: int) -> Conditioning:  # fmt: skip
        guidance = torch.tensor([r.guidance_scale for r in requests], device=self.device,
                                dtype=self.dtype).view(len(requests), 1, 1, 1)  # fmt: skip
        return Conditioning(embeds, pooled, guidance)

    def predict(self, scheduler: Any, latents: torch.Tensor, t: Any, cond: Conditioning,
                index: int) -> torch.Tensor:  # fmt: skip
        latent_in = torch.cat([latents, latents])
        if hasattr(scheduler, "scale_model_input"):  # DPM-Solver has one (identity); Euler none
            latent_in = scheduler.scale_model_input(latent_in, t)
        kwargs = {"encoder_hidden_states": cond.embeds, "pooled_projections": cond.pooled}
        noise = self.run(latent_in, t.expand(latent_in.shape[0]), kwargs)
        noise_uncond, noise_cond = noise.chunk(2)
        return noise_uncond + cond.guidance * (noise_cond - noise_uncond)

    def prompt_vectors(self, prompts: list[str]) -> torch.Tensor:
        return self.model.text_encoder(self.ids(self.model.tokenizer, prompts)).text_embeds


class FluxDenoiser(FlowDenoiser):
    """FLUX.1: CLIP's pooled output and T5's tokens; latents packed 2x2 into tokens with
    (0, row, column) position ids; guidance as the model's input (dev) or none (schnell)."""

    family = "flux"
    cfg = False

    def refusal(self, request: ImageRequest, width: int, height: int) -> RequestRefused | None:
        if request.negative_prompt:
            return RequestRefused("negative_prompt", (
                f"{self.model.name} is a FLUX model (guidance-distilled, one pass per step): "
                "it takes no negative prompt; leave it empty"
            ))  # fmt: skip
        return super().refusal(request, width, height)

    def encode(self, prompts: list[str]) -> list[TextRow]:
        m = self.model
        pooled = m.text_encoder(self.ids(m.tokenizer, prompts)).pooler_output
        width = self.transformer.config.joint_attention_dim
        tokens = self.t5_rows(m.text_encoder_2, m.tokenizer_2, prompts, width)
        return list(zip(tokens, pooled, strict=True))

    def conditioning(self, embeds: torch.Tensor, pooled: torch.Tensor | None,
                     requests: list[ImageRequest], width: int, height: int) -> Conditioning:  # fmt: skip
        rows, cols = height // self.factor // 2, width // self.factor // 2
        img_ids = torch.zeros(rows, cols, 3)
        img_ids[..., 1] = torch.arange(rows)[:, None]
        img_ids[..., 2] = torch.arange(cols)[None, :]
        extra = {
            "img_ids": img_ids.reshape(rows * cols, 3).to(self.device, self.dtype),
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype),
        }
        guidance = torch.tensor([r.guidance_scale for r in requests], device=self.device,
                                dtype=torch.float32)  # fmt: skip
        return Conditioning(embeds, pooled, guidance, extra)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: each 2x2 latent patch one token."""
        b, c, h, w = latents.shape
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def to_vae(self, latents: torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
        b, _, packed = latents.shape
        c = packed // 4
        x = latents.view(b, latent_h // 2, latent_w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return super().to_vae(x.reshape(b, c, latent_h, latent_w), latent_h, latent_w)

    def sigmas(self, steps: int) -> Any:
        return np.linspace(1.0, 1 / steps, steps)  # as diffusers' FLUX pipeline, dev and schnell

    def mu(self, width: int, height: int) -> float | None:
        config = self.model.scheduler_config
        if not config.get("use_dynamic_shifting"):
            return None
        base_len, max_len = (
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
        )
        base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (top - base) / (max_len - base_len)
        return self.image_tokens(width, height) * slope + base - slope * base_len

    def predict(self, scheduler: Any, latents: torch.Tensor, t: Any, cond: Conditioning,
                index: int) -> torch.Tensor:  # fmt: skip
        if hasattr(scheduler, "scale_model_input"):
            latents = scheduler.scale_model_input(latents, t)
        guided = self.transformer.config.guidance_embeds
        kwargs = {
            "guidance": cond.guidance if guided else None,
            "pooled_projections": cond.pooled, "encoder_hidden_states": cond.embeds,
            "txt_ids": cond.extra["txt_ids"], "img_ids": cond.extra["img_ids"],
        }  # fmt: skip
        timestep = (t / 1000).expand(latents.shape[0]).to(latents.dtype)
        return self.run(latents, timestep, kwargs)


def flow_scheduler(name: str, config: dict[str, Any], steps: int, device: Any,
                   sigmas: Any, mu: float | None) -> Any:  # fmt: skip
    """A fresh flow-matching scheduler with `steps` timesteps set (`sigmas`: unshifted, or
    None for the scheduler's own; `mu`: the dynamic shift, where the model has one)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    kind = Scheduler(name)
    if kind is Scheduler.dpmpp_2m:
        dynamic = bool(config.get("use_dynamic_shifting"))
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            use_flow_sigmas=True, prediction_type="flow_prediction",
            flow_shift=config.get("shift", 1.0), use_dynamic_shifting=dynamic,
            time_shift_type="exponential", algorithm_type="dpmsolver++", solver_order=2,
        )  # fmt: skip
        scheduler.set_timesteps(steps, device=device, mu=mu if dynamic else None)
        return scheduler
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        config, stochastic_sampling=kind is Scheduler.euler_a
    )
    scheduler.set_timesteps(steps, device=device, sigmas=sigmas, mu=mu)
    return scheduler


def dit_denoiser(model: Any, device: torch.device, dtype: torch.dtype, runner: Any,
                 cache_interval: int = 3) -> FlowDenoiser:  # fmt: skip
    """The denoiser of a transformer-family model, its transformer run by `runner`."""
    family = Sd3Denoiser if model.family == "sd3" else FluxDenoiser
    return family(model, device, dtype, runner, cache_interval)
