"""Model components made real: a preset built with seeded weights (or on the meta device),
a diffusers folder loaded offline, components saved as a diffusers folder, moved to a device.

One function per direction, each knowing the three families (pipeline/models.py says what
they are): unet (SD 1.x/2.x, SDXL), sd3 and flux.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import ConfigError
from .model_files import folder_weights_hash
from .models import ModelComponents, ModelPreset, _family_of
from .tokenizer import clip_tokenizer, t5_tokenizer


def build_preset(preset: ModelPreset, meta: bool = False) -> ModelComponents:
    """A preset's components in float32 on the CPU (or the meta device, buffers included:
    shapes only, for FLOP counting), with seeded weights."""
    import torch
    from accelerate import init_empty_weights

    if meta:
        with init_empty_weights(include_buffers=True):
            modules = _modules(preset)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(preset.init_seed)
            modules = _modules(preset)
    for module in modules.values():
        if module is not None:
            module.eval().requires_grad_(False)
    clip = clip_tokenizer()
    tokenizers = {"tokenizer": clip}
    if preset.family == "unet" and preset.text_encoder_2 is not None:
        tokenizers["tokenizer_2"] = clip
    elif preset.family == "sd3":
        tokenizers.update(tokenizer_2=clip, tokenizer_3=t5_tokenizer(preset.text_max_length))
    elif preset.family == "flux":
        tokenizers["tokenizer_2"] = t5_tokenizer(preset.text_max_length)
    sdxl = preset.family == "unet" and preset.text_encoder_2 is not None
    return ModelComponents(
        name=preset.name,
        family=preset.family,
        **modules,
        **tokenizers,
        scheduler_config=dict(preset.scheduler),
        weights_hash="meta" if meta else preset.recipe_hash(),
        default_size=preset.default_size,
        text_max_length=preset.text_max_length or 77,
        force_zeros_for_empty_prompt=(
            preset.force_zeros_for_empty_prompt
            if preset.force_zeros_for_empty_prompt is not None
            else sdxl
        ),
    )


def _modules(preset: ModelPreset) -> dict[str, Any]:
    """The preset's torch modules, by component name (in a fixed order: the seeded weights
    depend on it)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if preset.family == "unet":
        from diffusers import UNet2DConditionModel

        out = {"unet": UNet2DConditionModel(**preset.unet)}
    elif preset.family == "sd3":
        from diffusers import SD3Transformer2DModel

        out = {"unet": None, "transformer": SD3Transformer2DModel(**preset.transformer)}
    else:
        from diffusers import FluxTransformer2DModel

        out = {"unet": None, "transformer": FluxTransformer2DModel(**preset.transformer)}
    out["vae"] = AutoencoderKL(**preset.vae)
    clip_class = CLIPTextModelWithProjection if preset.family == "sd3" else CLIPTextModel
    out["text_encoder"] = clip_class(CLIPTextConfig(**preset.text_encoder))
    if preset.family == "flux":
        out["text_encoder_2"] = _t5(preset.text_encoder_2)
        return out
    if preset.text_encoder_2 is not None:
        out["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**preset.text_encoder_2))
    if preset.family == "sd3":
        out["text_encoder_3"] = _t5(preset.text_encoder_3)
    return out


def _t5(config: dict[str, Any]) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**config))


def save_model(components: ModelComponents, folder: str | Path) -> Path:
    """Write `components` as a diffusers-format folder that `load_model(folder)` reads back."""
    pipe = _pipeline(components)
    pipe.save_pretrained(str(folder))
    return Path(folder)


def _pipeline(c: ModelComponents) -> Any:
    if c.family in ("sd3", "flux"):
        from diffusers import (
            FlowMatchEulerDiscreteScheduler,
            FluxPipeline,
            StableDiffusion3Pipeline,
        )

        names = ["transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
        if c.family == "sd3":
            names += ["text_encoder_3", "tokenizer_3"]
        pipeline = StableDiffusion3Pipeline if c.family == "sd3" else FluxPipeline
        return pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config),
            **{name: getattr(c, name) for name in names},
        )
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler.from_config(c.scheduler_config)
    if c.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
            tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=scheduler,
        )  # fmt: skip
    return StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


def load_folder(path: Path) -> ModelComponents:
    """Components of a local diffusers folder (SD 1.x/2.x, SDXL, SD3/3.5 or FLUX.1), offline."""
    import json

    from diffusers import DiffusionPipeline

    if not (path / "model_index.json").is_file():
        raise ConfigError(f"model: {path} has no model_index.json (not a diffusers model folder)")
    index = json.loads((path / "model_index.json").read_text())
    family = _family_of(index)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    parts = {name: getattr(pipe, name, None) for name in (
        "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
        "tokenizer_3",
    )}  # fmt: skip
    if family == "unet":
        sdxl = parts["text_encoder_2"] is not None
        return ModelComponents(
            name=path.name, unet=pipe.unet, **parts,
            scheduler_config=dict(pipe.scheduler.config),
            weights_hash=folder_weights_hash(path),
            default_size=pipe.unet.config.sample_size * factor,
            force_zeros_for_empty_prompt=sdxl
            and bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
        )  # fmt: skip
    side = pipe.transformer.config.get("sample_size")
    return ModelComponents(
        name=path.name, unet=None, transformer=pipe.transformer, family=family, **parts,
        scheduler_config=dict(pipe.scheduler.config),
        weights_hash=folder_weights_hash(path),
        default_size=side * factor if side else vae_side(pipe.vae.config),
        text_max_length=_t5_length(pipe, family),
    )  # fmt: skip


def vae_side(vae_config: Any) -> int:
    """The native side a FLUX folder states (its transformer states none): the VAE's
    sample_size (1024 for FLUX.1's VAE)."""
    side = vae_config["sample_size"] if isinstance(vae_config, dict) else vae_config.sample_size
    return int(side[0] if isinstance(side, (list, tuple)) else side)


def _t5_length(pipe: Any, family: str) -> int:
    """T5 tokens per prompt for a folder: diffusers' defaults (SD3 256, FLUX 512; 256 for a
    FLUX without guidance embedding, as schnell is run), bounded by the tokenizer's
    model_max_length (which a saved preset sets to its own length)."""
    if family == "flux":
        length = 512 if pipe.transformer.config.get("guidance_embeds") else 256
    else:
        length = 256
    tokenizer = pipe.tokenizer_2 if family == "flux" else pipe.tokenizer_3
    limit = getattr(tokenizer, "model_max_length", None) or length
    return min(length, limit) if limit < 10**6 else length


def to_device(components: ModelComponents, device: Any, dtype: Any) -> None:
    """Move every module to `device` in `dtype` (the SD VAEs that overflow in float16 in
    float32; T5 never in float16, where it overflows: bfloat16 instead)."""
    import torch

    t5 = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}.get(components.family)
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(components, name)
        if module is not None:
            module_dtype = torch.bfloat16 if name == t5 and dtype == torch.float16 else dtype
            setattr(components, name, module.to(device=device, dtype=module_dtype))
    vae_dtype = (
        torch.float32 if (dtype == torch.float16 and components.vae.config.force_upcast) else dtype
    )
    components.vae = components.vae.to(device=device, dtype=vae_dtype)
