"""Models the engine runs: named presets with seeded random weights, or real diffusers folders.

Presets (`configs/models/<name>.yaml`) are built from architecture configs, never
downloaded: `tiny` for tests and the demo, `small` for CPU benchmarks, `sd15` and
`sdxl` with the real architectures' shapes. Every process building a preset gets the
same weights (seeded init), so engine actors on different nodes agree on every image.
A folder in diffusers format (`model_index.json`, `unet/`, `vae/`, ...) loads real
weights: a local path, or an object-store prefix (s3://...) copied once into a per-node
cache keyed by the listing (names, sizes, ETags), so a changed model is fetched again.

`describe_model` checks a model spec cheaply (no weights loaded) and says what it is:
the job and `serve` call it before any actor starts, so a wrong spec is one line.
`weights_hash` names the weights: for a folder the sha256 of its weight files, for a
preset the sha256 of its recipe (architecture, init seed, library versions), which is
what decides its seeded weights.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .config import ConfigError, validate_config
from .model_files import WEIGHT_SUFFIXES, fetch_model, folder_weights_hash
from .tokenizer import clip_tokenizer

# Where torchao is installed (engine.quantize), diffusers imports it with every model and it
# logs five lines that concern neither us nor the user (CUDA-only kernels it cannot load on
# this machine, torch deprecation notes, a checkpoint-format note): kept to errors only.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)

if TYPE_CHECKING:
    from .config import StorageConfig

SDXL_TIME_IDS = 6  # SDXL's micro-conditioning: original size, crop top-left, target size
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelPreset(BaseModel):
    """Architecture of a named preset; every sub-config is passed to its diffusers/transformers class."""

    model_config = ConfigDict(extra="forbid")

    name: str
    default_size: int = Field(description="Native image side in pixels.")
    init_seed: int = Field(0, description="Seed of the random weights.")
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any] | None = None
    scheduler: dict[str, Any]
    force_zeros_for_empty_prompt: bool | None = Field(
        None,
        description="Zero the unconditional embedding when a request has no negative prompt "
        "(diffusers' SDXL pipelines do); default: true for SDXL-shaped presets.",
    )

    def recipe_hash(self) -> str:
        """sha256 of what decides this preset's weights: its config and the library versions."""
        versions = {p: _version(p) for p in ("torch", "diffusers", "transformers")}
        text = json.dumps({"preset": self.model_dump(), "versions": versions}, sort_keys=True)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@dataclass
class ModelComponents:
    """Everything the engine needs of one model, on one device."""

    name: str
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel (SD) / CLIPTextModel (SDXL, first)
    tokenizer: Any
    scheduler_config: dict[str, Any]
    weights_hash: str
    default_size: int
    text_encoder_2: Any = None  # SDXL: CLIPTextModelWithProjection
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False  # no negative prompt -> zero uncond embedding

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None


def preset_names() -> list[str]:
    """Names of the shipped presets."""
    folder = importlib.resources.files("daguerre.configs") / "models"
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`, validated."""
    import yaml

    path = importlib.resources.files("daguerre.configs") / "models" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"model: {name!r} is neither a preset ({', '.join(preset_names())}) nor a folder"
        )
    return validate_config(
        ModelPreset, yaml.safe_load(path.read_text()), source=f"configs/models/{name}.yaml"
    )


@dataclass
class ModelInfo:
    """What a model spec names, found without loading weights."""

    spec: str
    name: str
    kind: Literal["preset", "folder", "remote", "served"]
    default_size: int  # native image side in pixels
    storage_config: StorageConfig | None = None
    _weights_hash: str | None = field(default=None, repr=False)

    @property
    def random_weights(self) -> bool:
        return self.kind == "preset"

    def describe(self) -> str:
        if self.kind == "preset":
            return (
                f"model {self.name}: a preset with seeded random weights, so its images are "
                "noise (for tests, demos and benchmarks; --model FOLDER loads real weights)"
            )
        if self.kind == "served":
            return f"model {self.name}: the engine replicas of Serve app {self.spec}"
        return f"model {self.name}: diffusers folder {self.spec}"

    def weights_hash(self) -> str:
        """The weights hash its images will record (a remote folder is fetched to hash it)."""
        if self._weights_hash is None:
            if self.kind == "preset":
                self._weights_hash = get_preset(self.spec).recipe_hash()
            elif self.kind == "folder":
                self._weights_hash = folder_weights_hash(Path(self.spec))
            else:
                self._weights_hash = folder_weights_hash(
                    fetch_model(self.spec, self.storage_config)
                )
        return self._weights_hash


def describe_model(spec: str, storage_config: StorageConfig | None = None) -> ModelInfo:
    """What `spec` names; raises ConfigError (or StorageError) with one line when it is not a
    usable model: an unknown preset, a folder missing parts, a Hugging Face Hub id."""
    from .storage import Storage, StorageError, explain, is_remote

    if is_remote(spec):
        storage = Storage(spec, storage_config)
        storage.check_readable()
        try:
            listing = [p[len(storage.root) :].lstrip("/") for p in storage.fs.find(storage.root)]
            index = json.loads(storage.fs.cat_file(storage.path("model_index.json")))
        except FileNotFoundError:
            raise ConfigError(
                f"model: {spec} has no model_index.json (not a diffusers model folder)"
            ) from None
        except ValueError as exc:
            raise ConfigError(f"model: {spec}/model_index.json is not valid JSON ({exc})") from None
        except Exception as exc:
            raise StorageError(f"{spec}: {explain(exc, storage)}") from None
        _check_folder(spec, index, set(listing))
        read = lambda rel: json.loads(storage.fs.cat_file(storage.path(rel)))  # noqa: E731
        name = spec.rstrip("/").rsplit("/", 1)[-1]
        return ModelInfo(spec, name, "remote", _folder_side(read), storage_config)
    path = Path(spec)
    if path.is_dir():
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise ConfigError(
                f"model: {spec} is a folder without model_index.json (not a diffusers model)"
            )
        try:
            index = json.loads(index_file.read_text())
        except ValueError as exc:
            raise ConfigError(f"model: {index_file} is not valid JSON ({exc})") from None
        files = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
        _check_folder(spec, index, files)
        read = lambda rel: json.loads((path / rel).read_text())  # noqa: E731
        return ModelInfo(str(path.resolve()), path.resolve().name, "folder", _folder_side(read))
    if spec not in preset_names() and _HUB_ID.match(spec) and not path.exists():
        raise ConfigError(
            f"model: {spec!r} looks like a Hugging Face Hub id; daguerre never downloads weights: "
            f"fetch the folder elsewhere (huggingface-cli download {spec} --local-dir DIR) "
            "and pass --model DIR"
        )
    preset = get_preset(spec)
    return ModelInfo(spec, preset.name, "preset", preset.default_size)


_CONFIGS = ("config.json", "scheduler_config.json", "tokenizer_config.json", "vocab.json",
            "preprocessor_config.json")  # fmt: skip


def _check_folder(spec: str, index: Any, files: set[str]) -> None:
    """A diffusers folder has a pipeline class and every component it lists, with its files."""
    if not isinstance(index, dict) or not index.get("_class_name"):
        raise ConfigError(
            f"model: {spec}/model_index.json has no _class_name (not a diffusers pipeline index)"
        )
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[:1] == [None]:
            continue
        inside = [f.split("/", 1)[1] for f in files if f.startswith(f"{name}/")]
        if not inside:
            raise ConfigError(
                f"model: {spec} lists the component {name!r} but has no {name}/ folder"
            )
        if not any(f.rsplit("/", 1)[-1] in _CONFIGS for f in inside):
            raise ConfigError(f"model: {spec}/{name}/ has no config file (config.json)")
        if name in ("unet", "vae", "text_encoder", "text_encoder_2") and not any(
            f.endswith(WEIGHT_SUFFIXES) for f in inside
        ):
            raise ConfigError(
                f"model: {spec}/{name}/ has no weights (*.safetensors or *.bin): incomplete download?"
            )


def _folder_side(read: Any) -> int:
    """Native image side of a diffusers folder, from its UNet and VAE configs."""
    try:
        unet, vae = read("unet/config.json"), read("vae/config.json")
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as exc:
        raise ConfigError(
            f"model: cannot read the native size from unet/ and vae/ configs ({exc})"
        ) from None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def load_model(
    spec: str,
    device: Any = "cpu",
    dtype: Any = None,
    meta: bool = False,
    storage_config: StorageConfig | None = None,
) -> ModelComponents:
    """The model named by `spec` (a preset, a diffusers folder or an s3:// prefix holding
    one), on `device` in `dtype`.

    With `meta=True` a preset is built on the meta device: shapes only, no memory, no
    weights (for FLOP counting)."""
    import torch

    from .storage import is_remote

    dtype = dtype or torch.float32
    path = Path(spec)
    if is_remote(spec):
        components = _load_folder(fetch_model(spec, storage_config))
        components.name = spec.rstrip("/").rsplit("/", 1)[-1]
    elif path.is_dir():
        components = _load_folder(path)
    else:
        components = build_preset(get_preset(spec), meta=meta)
    if not meta:
        _to(components, device, dtype)
    return components


def build_preset(preset: ModelPreset, meta: bool = False) -> ModelComponents:
    """A preset's components in float32 on the CPU (or the meta device), with seeded weights."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def build():
        unet = UNet2DConditionModel(**preset.unet)
        vae = AutoencoderKL(**preset.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**preset.text_encoder))
        text_encoder_2 = None
        if preset.text_encoder_2 is not None:
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**preset.text_encoder_2))
        return unet, vae, text_encoder, text_encoder_2

    if meta:
        with init_empty_weights():
            unet, vae, text_encoder, text_encoder_2 = build()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(preset.init_seed)
            unet, vae, text_encoder, text_encoder_2 = build()
    modules = [m for m in (unet, vae, text_encoder, text_encoder_2) if m is not None]
    for m in modules:
        m.eval().requires_grad_(False)
    tokenizer = clip_tokenizer()
    return ModelComponents(
        name=preset.name,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer if text_encoder_2 is not None else None,
        scheduler_config=dict(preset.scheduler),
        weights_hash="meta" if meta else preset.recipe_hash(),
        default_size=preset.default_size,
        force_zeros_for_empty_prompt=(
            preset.force_zeros_for_empty_prompt
            if preset.force_zeros_for_empty_prompt is not None
            else preset.text_encoder_2 is not None
        ),
    )


def save_model(components: ModelComponents, folder: str | Path) -> Path:
    """Write `components` as a diffusers-format folder that `load_model(folder)` reads back."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler.from_config(components.scheduler_config)
    if components.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2,
            unet=components.unet,
            scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            tokenizer=components.tokenizer,
            unet=components.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(str(folder))
    return Path(folder)


def _load_folder(path: Path) -> ModelComponents:
    """Components of a local diffusers folder (SD 1.x/2.x or SDXL layout), offline."""
    from diffusers import DiffusionPipeline

    if not (path / "model_index.json").is_file():
        raise ConfigError(f"model: {path} has no model_index.json (not a diffusers model folder)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    unet = pipe.unet
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    return ModelComponents(
        name=path.name,
        unet=unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        scheduler_config=dict(pipe.scheduler.config),
        weights_hash=folder_weights_hash(path),
        default_size=unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1),
        force_zeros_for_empty_prompt=sdxl
        and bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
    )


def _to(components: ModelComponents, device: Any, dtype: Any) -> None:
    import torch

    for name in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(components, name)
        if module is not None:
            setattr(components, name, module.to(device=device, dtype=dtype))
    # The SD VAEs overflow in float16 (diffusers marks them force_upcast): decode in float32.
    vae_dtype = (
        torch.float32 if (dtype == torch.float16 and components.vae.config.force_upcast) else dtype
    )
    components.vae = components.vae.to(device=device, dtype=vae_dtype)
