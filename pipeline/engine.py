"""DiffusionEngine: list[ImageRequest] -> list[GeneratedImage], the only place images are made.

Requests that can share one denoising loop (same size, steps, scheduler) form a bucket;
each bucket runs in chunks of at most `max_batch_size` images, with classifier-free
guidance batched where the family has it (uncond and cond in one denoiser call,
per-request guidance scale and negative prompt) and the VAE decoding the whole chunk.
What differs between model families (UNet, SD3, FLUX: text conditioning, latent packing,
the denoiser call, guidance style, schedulers) sits behind one `Denoiser`
(pipeline/denoisers.py); this file is the hot path they share. Every request draws its noise
from its own generator seeded by its seed, so an image does not depend on what it was
batched with (within 1/255: batch composition changes float rounding, nothing else).
LoRA adapters are per request (pipeline/lora.py): a batch mixes adapters, each sample
routed through its own, and a request whose adapter cannot be used fails alone.

The engine returns uint8 arrays; PNG encoding and storage run elsewhere, on CPU,
so the accelerator never waits for I/O.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from typing import Any

import torch

from .config import HOT_PATH_OPTIONS, EngineConfig, StorageConfig, first_line
from .denoiser_build import build_denoiser
from .image_inputs import ImageInput, LoopStart, image_refusal, start_step
from .lora import LoraAdapters, LoraError
from .models import SDXL_TIME_IDS, ModelComponents, describe_model, load_model
from .schema import BucketKey, GeneratedImage, ImageRequest, Speed, StageTimings, bucket_key
from .tokenizer import TEXT_MAX_LENGTH


def resolve_device(device: str) -> torch.device:
    """The torch device for a config value ('auto' picks CUDA when present)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, family: str = "unet") -> torch.dtype:
    """The torch dtype for a config value ('auto': on CUDA float16, bfloat16 for the
    transformer families, trained and run in it; float32 elsewhere)."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.float16 if family == "unet" else torch.bfloat16
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
        family = components.family if components is not None else None
        if family is None and self.config.dtype == "auto" and self.device.type == "cuda":
            family = describe_model(self.config.model, storage_config).family
        self.dtype = resolve_dtype(self.config.dtype, self.device, family or "unet")
        if self.device.type == "cpu":
            torch.set_num_threads(self.config.torch_threads or os.cpu_count() or 1)
        self.model = components or load_model(
            self.config.model, device=self.device, dtype=self.dtype, storage_config=storage_config
        )
        from ..kernels.quantize import Quantization, quantize_unet

        if self.config.quantize is not Quantization.none:
            quantize_unet(self.model.denoiser, self.config.quantize, self.device)
        self.denoiser, self.attention = build_denoiser(self.model, self.config, self.device,
                                                       self.dtype)  # fmt: skip
        if self.model.family == "unet":
            refusal = self._lora_refusal(self.denoiser.runner.backend.value)
        else:
            refusal = (f"needs a UNet model; {self.model.name} is a {self.model.family} "
                       "transformer (LoRA for transformers is not supported yet)")  # fmt: skip
        self._prompt_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = (
            OrderedDict()
        )
        self.lora = LoraAdapters(self.model.unet, self.config.lora_cache_size, storage_config,
                                 refusal=refusal)  # fmt: skip
        self.prompt_cache_hits = 0
        self.prompt_cache_misses = 0

    @property
    def backend(self) -> dict[str, str]:
        """What runs the math, recorded in every image's metadata."""
        backend = {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": self.attention.describe(),
        }
        runner = self.denoiser.runner.backend.value
        if self.model.family == "unet":
            backend["unet"] = runner
        else:
            backend["transformer"] = f"{self.model.family} {runner}"
        if runner != "eager":  # step caching hooks into the eager module: speed cached runs it
            backend["speed_cached"] = "eager"
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

    def request_errors(self, requests: list[ImageRequest],
                       images: list[ImageInput | None] | None = None) -> dict[int, Exception]:  # fmt: skip
        """{index: why} for the requests this engine cannot make: what the model's family
        refuses (a scheduler without a flow form, a negative prompt for FLUX, a size off its
        grid), an init image it cannot start from, then an adapter that cannot be used (the
        others' adapters load on the way)."""
        failed: dict[int, Exception] = {}
        for i, request in enumerate(requests):
            image = images[i] if images else None
            width, height = self._size(request, image)
            refused = self.denoiser.refusal(request, width, height)
            if refused is None:
                refused = image_refusal(image, request.steps, width, height, self.model)
            if refused is not None:
                failed[i] = refused
        tried: dict[tuple[str, float], Exception | None] = {}
        for i, request in enumerate(requests):
            if request.lora is None or i in failed:
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

    def _size(self, request: ImageRequest, image: ImageInput | None) -> tuple[int, int]:
        """(width, height) made: an init image's own when the request gives no size."""
        if image is not None and request.sized_by_image:
            return image.pixels.shape[1], image.pixels.shape[0]
        return request.resolved_size(self.model.default_size)

    def prepare(self, width: int, height: int) -> list[Any]:
        """Build (or find cached) what the denoiser's backend needs for one image size."""
        if self.model.family != "unet":
            rows = self.denoiser.runner.rows_per_image
            return self.denoiser.runner.prepare(self.denoiser.forward_inputs(rows, width, height))
        factor = self.model.vae_scale_factor
        return self.denoiser.runner.prepare(
            height // factor, width // factor, TEXT_MAX_LENGTH,
            SDXL_TIME_IDS if self.model.is_sdxl else None,
        )  # fmt: skip

    # -- the hot path ---------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, requests: list[ImageRequest],
                 images: list[ImageInput | None] | None = None) -> list[GeneratedImage]:  # fmt: skip
        """One image per request, in the order given; `images[i]`, where given, is request
        i's init image (img2img, pipeline/image_inputs.py)."""
        images = [None] * len(requests) if images is None else images
        if len(images) != len(requests):
            raise ValueError(f"{len(images)} init images for {len(requests)} requests")
        buckets: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            buckets.setdefault(self._loop_key(request, images[i]), []).append(i)
        out: list[GeneratedImage | None] = [None] * len(requests)
        for key, indices in buckets.items():
            for chunk in self._chunks(indices, requests):
                made = self._generate_chunk(key, [requests[i] for i in chunk],
                                            [images[i] for i in chunk])  # fmt: skip
                for i, image in zip(chunk, made, strict=True):
                    out[i] = image
        return out  # type: ignore[return-value]

    def _loop_key(self, request: ImageRequest, image: ImageInput | None) -> tuple:
        """The bucket key plus where the loop starts: None from noise, else (img2img or
        inpaint, the step the init image enters at): loops that start elsewhere are apart."""
        key = (*self._size(request, image), *self.bucket_key(request)[2:])
        refused = image_refusal(image, request.steps, key[0], key[1], self.model)
        if refused is not None:  # callers find these per row with request_errors first
            raise refused
        if image is None:
            return (*key, None)
        return (*key, (image.kind, start_step(request.steps, image.strength)))

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

    def _generate_chunk(self, key: tuple, requests: list[ImageRequest],
                        images: list[ImageInput | None]) -> list[GeneratedImage]:  # fmt: skip
        width, height, steps, scheduler_name, speed, entry = key
        batch = len(requests)
        denoiser = self.denoiser
        latent_h, latent_w = height // denoiser.factor, width // denoiser.factor

        # 1. Text conditioning: with CFG [2B, S, D], negative prompts first, then prompts.
        t0 = self._clock()
        embeds, pooled = self.encode_prompts(denoiser.prompts(requests))
        cond = denoiser.conditioning(embeds, pooled, requests, width, height)
        t1 = self._clock()

        # 2. Per-request initial noise from per-request generators (CPU by default), drawn
        #    unpacked [1, C, h, w] each (FLUX packs it after, as diffusers does); init images
        #    are encoded first, sampled with the same generators (pipeline/image_inputs.py).
        noise_device = self.device if self.config.noise_on_device else torch.device("cpu")
        generators = [torch.Generator(noise_device).manual_seed(r.resolved_seed) for r in requests]
        start = LoopStart(entry, images, denoiser, self.model)
        start.encode(generators)
        shape = (1, *denoiser.noise_shape(latent_h, latent_w))
        noise = torch.cat([torch.randn(shape, generator=g, device=noise_device)
                           for g in generators])  # fmt: skip
        noise = denoiser.pack(noise.to(self.device, self.dtype))
        start.condition(cond, generators, latent_h, latent_w)

        # 3. Timesteps. A scheduler instance is stateful: one per chunk. From noise the loop
        #    runs them all; from an init image those from its start on, the image noised to
        #    it (inpainting at strength 1: from noise), a mask putting back what it keeps.
        scheduler = denoiser.scheduler(scheduler_name, steps, width, height)
        timesteps, latents, blend = start.loop(scheduler, noise)

        # 4. Denoising loop (speed: cached skips most of the model between full steps),
        #    each sample through its request's LoRA adapter: names [2B], uncond then cond half.
        adapters = self.lora.names(requests)
        adapter_files = [self.lora.loaded.get(name) for name in adapters]  # None: no adapter
        with self.lora.routed(adapters + adapters), denoiser.loop(speed == Speed.cached.value):
            for index, t in enumerate(timesteps):
                prediction = denoiser.predict(scheduler, latents, t, cond, index)
                # Ancestral samplers draw fresh noise per step: each request from its own generator.
                latents = scheduler.step(prediction, t, latents, generator=generators).prev_sample
                if blend is not None:
                    latents = blend(index, latents)
        t2 = self._clock()

        # 5. VAE decode, [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3].
        decoded = self.model.vae.decode(denoiser.to_vae(latents, latent_h, latent_w)).sample
        decoded = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        made = decoded.permute(0, 2, 3, 1).cpu().numpy()
        t3 = self._clock()

        share = StageTimings(
            text_encode_s=(t1 - t0) / batch,
            denoise_s=(t2 - t1) / batch,
            vae_decode_s=(t3 - t2) / batch,
        )
        scheduler_config = json.dumps(_scheduler_record(scheduler, denoiser, width, height),
                                      sort_keys=True, default=str)  # fmt: skip
        return [
            GeneratedImage(
                request=r,
                image=made[i],
                seed=r.resolved_seed,
                width=width,
                height=height,
                batch_size=batch,
                scheduler_config=scheduler_config,
                timings=share,
                lora_sha256=None if adapter_files[i] is None else adapter_files[i].sha256,
                inputs=None if images[i] is None else images[i].provenance,
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
        return self.denoiser.encode(prompts)

    @torch.no_grad()
    def prompt_vectors(self, prompts: list[str]) -> Any:
        """Unit vectors [N, D] (np.float16) of prompts from the model's own text encoder: its
        pooled output (CLIP's end-of-text token; SDXL's second encoder's projection, SD3's
        first CLIP's), what the semantic cache compares."""
        pooled = self.denoiser.prompt_vectors(prompts).float()
        unit = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return unit.cpu().numpy().astype("float16")

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _scheduler_record(scheduler: Any, denoiser: Any, width: int, height: int) -> dict[str, Any]:
    """The scheduler's class and config as the metadata records it (plus FLUX's resolution
    shift mu)."""
    record = {**dict(scheduler.config), "_class_name": type(scheduler).__name__}
    mu = denoiser.mu(width, height)
    if mu is not None:
        record["mu"] = mu
    return record
