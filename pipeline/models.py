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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .config import ConfigError, validate_config
from .model_files import WEIGHT_SUFFIXES, fetch_model, folder_weights_hash

# Where torchao is installed (engine.quantize), diffusers imports it with every model and it
# logs five lines that concern neither us nor the user (CUDA-only kernels it cannot load on
# this machine, torch deprecation notes, a checkpoint-format note): kept to errors only.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class _NoEmptyFp32Note(logging.Filter):
    """diffusers warns on every `.to(dtype)` of a transformer that lists no modules to keep
    in float32 ("...kept in float32: []"): nothing to act on, so not shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFp32Note())

if TYPE_CHECKING:
    from .config import StorageConfig

SDXL_TIME_IDS = 6  # SDXL's micro-conditioning: original size, crop top-left, target size
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


Family = Literal["unet", "sd3", "flux"]  # the denoiser families (pipeline/denoisers.py)
# Preset fields added with the transformer families: left out of the recipe hash at their
# defaults, so the UNet presets keep the weights hash (and the result cache) they had.
_FAMILY_FIELDS = {"family": "unet", "transformer": None, "text_encoder_3": None,
                  "text_max_length": None}  # fmt: skip


class ModelPreset(BaseModel):
    """Architecture of a named preset; every sub-config is passed to its diffusers/transformers class.

    `family` picks the classes: unet (SD 1.x/2.x, SDXL with text_encoder_2), sd3 (an
    SD3Transformer2DModel, two CLIPs with projection and T5 as text_encoder_3) or flux (a
    FluxTransformer2DModel, CLIP as text_encoder and T5 as text_encoder_2, as diffusers names them)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    family: Family = "unet"
    default_size: int = Field(description="Native image side in pixels.")
    init_seed: int = Field(0, description="Seed of the random weights.")
    unet: dict[str, Any] | None = None
    transformer: dict[str, Any] | None = None
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any] | None = None
    text_encoder_3: dict[str, Any] | None = None
    text_max_length: int | None = Field(
        None, ge=1, description="T5 tokens per prompt (sd3 and flux; CLIP always takes 77)."
    )
    scheduler: dict[str, Any]
    force_zeros_for_empty_prompt: bool | None = Field(
        None,
        description="Zero the unconditional embedding when a request has no negative prompt "
        "(diffusers' SDXL pipelines do); default: true for SDXL-shaped presets.",
    )

    @model_validator(mode="after")
    def _check_family(self) -> ModelPreset:
        denoiser = "unet" if self.family == "unet" else "transformer"
        if getattr(self, denoiser) is None:
            raise ValueError(f"{denoiser}: a {self.family} preset needs a {denoiser} config")
        t5 = {"unet": None, "sd3": "text_encoder_3", "flux": "text_encoder_2"}[self.family]
        if t5 and (getattr(self, t5) is None or self.text_max_length is None):
            raise ValueError(f"{t5}: a {self.family} preset needs a T5 config and text_max_length")
        return self

    def recipe_hash(self) -> str:
        """sha256 of what decides this preset's weights: its config and the library versions."""
        versions = {p: _version(p) for p in ("torch", "diffusers", "transformers")}
        preset = {k: v for k, v in self.model_dump().items()
                  if not (k in _FAMILY_FIELDS and v == _FAMILY_FIELDS[k])}  # fmt: skip
        text = json.dumps({"preset": preset, "versions": versions}, sort_keys=True)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@dataclass
class ModelComponents:
    """Everything the engine needs of one model, on one device (diffusers' component names)."""

    name: str
    unet: Any  # diffusers UNet2DConditionModel (None for the transformer families)
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # CLIPTextModel (SD, SDXL's first, FLUX) / ...WithProjection (SD3)
    tokenizer: Any
    scheduler_config: dict[str, Any]
    weights_hash: str
    default_size: int
    text_encoder_2: Any = None  # SDXL, SD3: CLIPTextModelWithProjection; FLUX: T5EncoderModel
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False  # no negative prompt -> zero uncond embedding
    family: Family = "unet"
    transformer: Any = None  # SD3Transformer2DModel / FluxTransformer2DModel
    text_encoder_3: Any = None  # SD3: T5EncoderModel
    tokenizer_3: Any = None
    text_max_length: int = 77  # T5 tokens per prompt (transformer families)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_sdxl(self) -> bool:
        return self.family == "unet" and self.text_encoder_2 is not None

    @property
    def denoiser(self) -> Any:
        """The module that denoises: the UNet or the transformer."""
        return self.unet if self.family == "unet" else self.transformer


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
    family: Family = "unet"

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
        return ModelInfo(spec, name, "remote", _folder_side(read), storage_config,
                         family=_family_of(index))  # fmt: skip
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
        return ModelInfo(str(path.resolve()), path.resolve().name, "folder", _folder_side(read),
                         family=_family_of(index))  # fmt: skip
    if spec not in preset_names() and _HUB_ID.match(spec) and not path.exists():
        raise ConfigError(
            f"model: {spec!r} looks like a Hugging Face Hub id; daguerre never downloads weights: "
            f"fetch the folder elsewhere (huggingface-cli download {spec} --local-dir DIR) "
            "and pass --model DIR"
        )
    preset = get_preset(spec)
    return ModelInfo(spec, preset.name, "preset", preset.default_size, family=preset.family)


def _family_of(index: dict[str, Any]) -> Family:
    """A diffusers folder's family, from its pipeline class."""
    return {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}.get(
        index.get("_class_name", ""), "unet"
    )


_CONFIGS = ("config.json", "scheduler_config.json", "tokenizer_config.json", "vocab.json",
            "preprocessor_config.json")  # fmt: skip


_WEIGHTED = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


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
        if name in _WEIGHTED and not any(f.endswith(WEIGHT_SUFFIXES) for f in inside):
            raise ConfigError(
                f"model: {spec}/{name}/ has no weights (*.safetensors or *.bin): incomplete download?"
            )


def _folder_side(read: Any) -> int:
    """Native image side of a diffusers folder, from its denoiser's and VAE's configs (a
    FLUX transformer states none: the VAE's sample_size)."""
    from .model_build import vae_side

    try:
        vae = read("vae/config.json")
        try:
            denoiser = read("unet/config.json")
        except FileNotFoundError:
            denoiser = read("transformer/config.json")
        if (
            "sample_size" not in denoiser
            and denoiser.get("_class_name") == "FluxTransformer2DModel"
        ):
            return vae_side(vae)
        return int(denoiser["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as exc:
        raise ConfigError(
            f"model: cannot read the native size from the unet/ (or transformer/) and vae/ "
            f"configs ({exc})"
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

    from .model_build import build_preset, load_folder, to_device
    from .storage import is_remote

    dtype = dtype or torch.float32
    path = Path(spec)
    if is_remote(spec):
        components = load_folder(fetch_model(spec, storage_config))
        components.name = spec.rstrip("/").rsplit("/", 1)[-1]
    elif path.is_dir():
        components = load_folder(path)
    else:
        components = build_preset(get_preset(spec), meta=meta)
    if not meta:
        to_device(components, device, dtype)
    return components
