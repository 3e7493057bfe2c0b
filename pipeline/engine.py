"""DiffusionEngine: list[ImageRequest] -> list[GeneratedImage], the only place images are made.

Requests that can share one denoising loop (same size, steps, scheduler) form a bucket;
each bucket runs in chunks of at most `max_batch_size` images, with classifier-free
guidance batched (uncond and cond in one UNet call, per-request guidance scale and
negative prompt) and the VAE decoding the whole chunk. Every request draws its noise
from its own generator seeded by its seed, so an image does not depend on what it was
batched with (within 1/255: batch composition changes float rounding, nothing else).
LoRA adapters are per request (pipeline/lora.py): a batch mixes adapters, each sample
routed through its own, and a request whose adapter cannot be used fails alone.

The engine returns uint8 arrays; PNG encoding and storage run elsewhere, on CPU,
so the accelerator never waits for I/O.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from typing import Any

import torch

from .config import HOT_PATH_OPTIONS, EngineConfig, StorageConfig, first_line
from .lora import LoraAdapters, LoraError
from .models import SDXL_TIME_IDS, ModelComponents, load_model
from .schema import (
    BucketKey,
    GeneratedImage,
    ImageRequest,
    Scheduler,
    Speed,
    StageTimings,
    bucket_key,
)
from .tokenizer import TEXT_MAX_LENGTH

logger = logging.getLogger(__name__)


def _scheduler(name: str, base_config: dict[str, Any]) -> Any:
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


def resolve_device(device: str) -> torch.device:
    """The torch device for a config value ('auto' picks CUDA when present)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype for a config value ('auto': float16 on CUDA, float32 elsewhere)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class DiffusionEngine:
    """Generates images for lists of requests with one model on one device."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        components: ModelComponents | None = None,
        storage_config: StorageConfig | None = None,
    ):
        self.config = config or EngineConfig()
        self.device = resolve_device(self.config.device)
        self.dtype = resolve_dtype(self.config.dtype, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(self.config.torch_threads or os.cpu_count() or 1)
        self.model = components or load_model(
            self.config.model, device=self.device, dtype=self.dtype, storage_config=storage_config
        )
        from ..kernels.attention import fuse_qkv, install
        from ..kernels.compile import make_runner
        from ..kernels.quantize import QUANTIZABLE_UNET_BACKENDS, Quantization, quantize_unet

        if self.config.fuse_qkv:
            fuse_qkv(self.model.unet)
        if self.config.channels_last:
            self.model.unet.to(memory_format=torch.channels_last)
            self.model.vae.to(memory_format=torch.channels_last)
        if self.config.quantize is not Quantization.none:
            quantize_unet(self.model.unet, self.config.quantize, self.device)
        self.attention = install(self.model.unet, self.config.attention_backend, self.device.type)
        unet_backend = self.config.unet_backend.value
        if unet_backend == "auto":
            from .bench import fastest_unet_backend

            quantized = self.config.quantize is not Quantization.none
            unet_backend, why = fastest_unet_backend(
                self.config.model, self.device, QUANTIZABLE_UNET_BACKENDS if quantized else None
            )
            logger.info("unet_backend auto -> %s (%s)", unet_backend, why)
        self.unet = make_runner(
            self.model.unet, unet_backend, self.model.weights_hash,
            max_batch_size=self.config.max_batch_size, compile_mode=self.config.compile_mode,
        )  # fmt: skip
        self._prompt_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = (
            OrderedDict()
        )
        self._deep_cache: Any = None  # kernels/deep_cache.py, made at the first cached request
        self.lora = LoraAdapters(self.model.unet, self.config.lora_cache_size, storage_config,
                                 refusal=self._lora_refusal(unet_backend))  # fmt: skip
        self.prompt_cache_hits = 0
        self.prompt_cache_misses = 0

    @property
    def backend(self) -> dict[str, str]:
        """What runs the math, recorded in every image's metadata."""
        backend = {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": self.attention.describe(),
            "unet": self.unet.backend.value,
        }
        hot_path = [name for name in HOT_PATH_OPTIONS if getattr(self.config, name)]
        if hot_path:
            backend["hot_path"] = ",".join(hot_path)
        if self.config.quantize.value != "none":
            backend["quantize"] = self.config.quantize.value
        return backend

    def _lora_refusal(self, unet_backend: str) -> str | None:
        """Why this engine cannot route LoRA adapters (None: it can)."""
        if unet_backend != "eager":
            return (f"needs unet_backend eager; this engine runs {unet_backend}, whose compiled "
                    "UNet graph cannot route samples through adapters")  # fmt: skip
        if self.config.fuse_qkv:
            return "needs fuse_qkv off (adapters target the separate q, k and v projections)"
        if self.config.quantize.value != "none":
            return "needs quantize none (adapters on 8-bit layers are not supported)"
        return None

    def adapter_errors(self, requests: list[ImageRequest]) -> dict[int, Exception]:
        """{index: why} for the requests whose LoRA adapter cannot be used (the others'
        adapters are loaded on the way)."""
        failed: dict[int, Exception] = {}
        tried: dict[tuple[str, float], Exception | None] = {}
        for i, request in enumerate(requests):
            if request.lora is None:
                continue
            key = (request.lora, request.lora_scale)
            if key not in tried:
                try:
                    self.lora.names([request])
                    tried[key] = None
                except Exception as exc:  # a load that breaks in peft is the adapter's fault too
                    tried[key] = exc if isinstance(exc, LoraError) else LoraError(
                        request.lora, f"failed to load ({type(exc).__name__}: {first_line(exc)})"
                    )  # fmt: skip
            if tried[key] is not None:
                failed[i] = tried[key]
        return failed

    def bucket_key(self, request: ImageRequest) -> BucketKey:
        """Requests with equal keys can share one denoising loop."""
        return bucket_key(request, self.model.default_size)

    def prepare(self, width: int, height: int) -> list[Any]:
        """Build (or find cached) what the UNet backend needs for one image size."""
        factor = self.model.vae_scale_factor
        return self.unet.prepare(
            height // factor, width // factor, TEXT_MAX_LENGTH,
            SDXL_TIME_IDS if self.model.is_sdxl else None,
        )  # fmt: skip

    # -- the hot path ---------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, requests: list[ImageRequest]) -> list[GeneratedImage]:
        """One image per request, in the order given."""
        buckets: dict[BucketKey, list[int]] = {}
        for i, request in enumerate(requests):
            buckets.setdefault(self.bucket_key(request), []).append(i)
        out: list[GeneratedImage | None] = [None] * len(requests)
        for key, indices in buckets.items():
            for chunk in self._chunks(indices, requests):
                for i, image in zip(
                    chunk, self._generate_chunk(key, [requests[i] for i in chunk]), strict=True
                ):
                    out[i] = image
        return out  # type: ignore[return-value]

    def _chunks(self, indices: list[int], requests: list[ImageRequest]) -> list[list[int]]:
        """One bucket's requests as engine batches: at most max_batch_size each, naming at
        most lora_cache_size adapters (so a batch's adapters are all loaded at once; when
        the bucket names more, requests of one adapter are kept together)."""

        def adapter(i: int) -> tuple[str, float] | None:
            return (requests[i].lora, requests[i].lora_scale) if requests[i].lora else None

        room = self.config.lora_cache_size
        if len({adapter(i) for i in indices} - {None}) > room:
            indices = sorted(indices, key=lambda i: (adapter(i) is not None, adapter(i) or ("", 0)))
        chunks: list[list[int]] = []
        chunk: list[int] = []
        named: set[tuple[str, float]] = set()
        for i in indices:
            new = adapter(i) is not None and adapter(i) not in named
            if len(chunk) == self.config.max_batch_size or (new and len(named) == room):
                chunks.append(chunk)
                chunk, named = [], set()
            chunk.append(i)
            if adapter(i) is not None:
                named.add(adapter(i))
        return chunks + [chunk] if chunk else chunks

    def _generate_chunk(self, key: BucketKey, requests: list[ImageRequest]) -> list[GeneratedImage]:
        width, height, steps, scheduler_name, speed = key
        batch = len(requests)
        model = self.model
        factor = model.vae_scale_factor

        # 1. Text embeddings, [2B, 77, D]: negative prompts first, then prompts (CFG in one call).
        t0 = self._clock()
        prompts = [r.negative_prompt for r in requests] + [r.prompt for r in requests]
        text_embeds, pooled = self.encode_prompts(prompts)
        if model.force_zeros_for_empty_prompt:  # as diffusers' SDXL: no negative -> zeros
            empty = torch.tensor([not r.negative_prompt for r in requests] + [False] * batch)
            text_embeds[empty.to(self.device)] = 0
            pooled[empty.to(self.device)] = 0
        added_cond = None
        if model.is_sdxl:
            # SDXL's micro-conditioning: original size, crop top-left, target size.
            time_ids = torch.tensor(
                [[height, width, 0, 0, height, width]], device=self.device, dtype=self.dtype
            )
            added_cond = {"text_embeds": pooled, "time_ids": time_ids.repeat(2 * batch, 1)}
        t1 = self._clock()

        # 2. Per-request initial noise from per-request generators (CPU by default): [B, 4, h, w].
        noise_device = self.device if self.config.noise_on_device else torch.device("cpu")
        generators = [torch.Generator(noise_device).manual_seed(r.resolved_seed) for r in requests]
        latent_shape = (1, model.unet.config.in_channels, height // factor, width // factor)
        latents = torch.cat([torch.randn(latent_shape, generator=g, device=noise_device)
                             for g in generators])  # fmt: skip
        latents = latents.to(self.device, self.dtype)

        # 3. Timesteps. A scheduler instance is stateful: one per chunk.
        scheduler = _scheduler(scheduler_name, model.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        latents = latents * scheduler.init_noise_sigma
        guidance = torch.tensor(
            [r.guidance_scale for r in requests], device=self.device, dtype=self.dtype
        )
        guidance = guidance.view(batch, 1, 1, 1)

        # 4. Denoising loop (speed: cached runs the whole UNet every cache_interval steps),
        #    each sample through its request's LoRA adapter: names [2B], uncond then cond half.
        unet = self._step_cache() if speed == Speed.cached.value else None
        adapters = self.lora.names(requests)
        adapter_files = [self.lora.loaded.get(name) for name in adapters]  # None: no adapter
        with self.lora.routed(adapters + adapters):
            for index, t in enumerate(scheduler.timesteps):
                latent_in = scheduler.scale_model_input(
                    torch.cat([latents, latents]), t
                )  # [2B, 4, h, w]
                if unet is None:
                    noise = self.unet(latent_in, t, text_embeds, added_cond)
                else:
                    noise = unet(index, latent_in, t, text_embeds, added_cond)
                noise_uncond, noise_cond = noise.chunk(2)
                noise = noise_uncond + guidance * (noise_cond - noise_uncond)
                # Ancestral samplers draw fresh noise per step: each request from its own generator.
                latents = scheduler.step(noise, t, latents, generator=generators).prev_sample
        t2 = self._clock()

        # 5. VAE decode, [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3].
        vae = model.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor
        pixels = vae.decode(latents).sample
        pixels = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        images = pixels.permute(0, 2, 3, 1).cpu().numpy()
        t3 = self._clock()

        share = StageTimings(
            text_encode_s=(t1 - t0) / batch,
            denoise_s=(t2 - t1) / batch,
            vae_decode_s=(t3 - t2) / batch,
        )
        scheduler_config = json.dumps(dict(scheduler.config), sort_keys=True, default=str)
        return [
            GeneratedImage(
                request=r,
                image=images[i],
                seed=r.resolved_seed,
                width=width,
                height=height,
                batch_size=batch,
                scheduler_config=scheduler_config,
                timings=share,
                lora_sha256=None if adapter_files[i] is None else adapter_files[i].sha256,
            )
            for i, r in enumerate(requests)
        ]

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings [N, 77, D] (and SDXL's pooled [N, P]) for prompts, through the LRU cache."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        self.prompt_cache_misses += len(missing)
        self.prompt_cache_hits += len(prompts) - len(missing)
        fresh = dict(zip(missing, self._encode_uncached(missing), strict=True)) if missing else {}
        rows = [fresh[p] if p in fresh else self._prompt_cache[p] for p in prompts]
        limit = self.config.prompt_cache_size
        for p in prompts:  # touch in use order, then bound the cache
            if p in fresh:
                self._prompt_cache[p] = fresh[p]
            if p in self._prompt_cache:
                self._prompt_cache.move_to_end(p)
        while len(self._prompt_cache) > limit:
            self._prompt_cache.popitem(last=False)
        embeds = torch.stack([r[0] for r in rows])
        pooled = torch.stack([r[1] for r in rows]) if rows[0][1] is not None else None
        return embeds, pooled

    def _encode_uncached(
        self, prompts: list[str]
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        model = self.model

        def ids(tokenizer: Any) -> torch.Tensor:
            tokens = tokenizer(
                prompts,
                padding="max_length",
                max_length=TEXT_MAX_LENGTH,
                truncation=True,
                return_tensors="pt",
            )
            return tokens.input_ids.to(self.device)

        if not model.is_sdxl:
            hidden = model.text_encoder(ids(model.tokenizer))[0]  # [N, 77, D]
            return [(h, None) for h in hidden]
        # SDXL: both encoders' penultimate hidden states side by side; pooled from the second.
        out_1 = model.text_encoder(ids(model.tokenizer), output_hidden_states=True)
        out_2 = model.text_encoder_2(ids(model.tokenizer_2), output_hidden_states=True)
        hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        pooled = out_2.text_embeds
        return list(zip(hidden, pooled, strict=True))

    @torch.no_grad()
    def prompt_vectors(self, prompts: list[str]) -> Any:
        """Unit vectors [N, D] (np.float16) of prompts from the model's own text encoder: its
        pooled output (CLIP's end-of-text token; SDXL's second encoder's projection), what
        the semantic cache compares."""
        model = self.model

        def ids(tokenizer: Any) -> torch.Tensor:
            return tokenizer(prompts, padding="max_length", max_length=TEXT_MAX_LENGTH,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)  # fmt: skip

        if model.is_sdxl:
            pooled = model.text_encoder_2(ids(model.tokenizer_2)).text_embeds
        else:
            pooled = model.text_encoder(ids(model.tokenizer)).pooler_output
        pooled = pooled.float()
        unit = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return unit.cpu().numpy().astype("float16")

    def _step_cache(self) -> Any:
        """The step-caching runner over the eager UNet (made once), its cache emptied."""
        from ..kernels.deep_cache import DeepCacheUNet

        if self._deep_cache is None:
            self._deep_cache = DeepCacheUNet(self.model.unet, self.config.cache_interval)
        self._deep_cache.reset()
        return self._deep_cache

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
