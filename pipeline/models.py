"""Models the engine runs: named presets with seeded random weights, or real diffusers folders.

Presets (`configs/models/<name>.yaml`) are built from architecture configs, never
downloaded: `tiny` for tests and the demo, `small` for CPU benchmarks, `sd15` and
`sdxl` with the real architectures' shapes. Every process building a preset gets the
same weights (seeded init), so engine actors on different nodes agree on every image.
A folder in diffusers format (`model_index.json`, `unet/`, `vae/`, ...) loads real
weights: a local path, or an object-store prefix (s3://...) copied once into a per-node
cache keyed by the listing (names, sizes, ETags), so a changed model is fetched again.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daguerre.pipeline.config import ConfigError, validate_config

if TYPE_CHECKING:
    from daguerre.pipeline.config import StorageConfig
from pydantic import BaseModel, ConfigDict, Field

TEXT_MAX_LENGTH = 77  # CLIP's context length


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


def describe_model(spec: str, storage_config: StorageConfig | None = None) -> str:
    """A one-line check that `spec` names a loadable model; raises ConfigError otherwise (cheap)."""
    from daguerre.pipeline.storage import Storage, StorageError, explain, is_remote

    if is_remote(spec):
        storage = Storage(spec, storage_config)
        storage.check_readable()
        try:
            storage.fs.info(storage.path("model_index.json"))
        except FileNotFoundError:
            raise ConfigError(
                f"model: {spec} has no model_index.json (not a diffusers model folder)"
            ) from None
        except Exception as exc:
            raise StorageError(f"{spec}: {explain(exc, storage)}") from None
        return f"diffusers folder {spec}"
    path = Path(spec)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ConfigError(
                f"model: {spec} is a folder without model_index.json (not a diffusers model)"
            )
        return f"diffusers folder {path.resolve()}"
    return f"preset {get_preset(spec).name}"


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
    from daguerre.pipeline.storage import is_remote

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
        weights_hash="meta" if meta else _state_hash(modules),
        default_size=preset.default_size,
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
    )


def model_cache_dir() -> Path:
    """Where fetched models live on this node: $DAGUERRE_CACHE/models or ~/.cache/daguerre/models."""
    from daguerre.kernels.compile import cache_root

    return cache_root() / "models"


def fetch_model(uri: str, storage_config: StorageConfig | None = None) -> Path:
    """A local copy of the diffusers folder at `uri`, fetched once per node and content listing.

    The copy is made in a temporary sibling and renamed into place, so concurrent actors on
    one node never load a half-copied folder (the loser of the race drops its copy)."""
    import shutil
    import uuid

    from daguerre.pipeline.storage import Storage, StorageError, explain

    storage = Storage(uri, storage_config)
    try:
        listing = storage.fs.find(storage.root, detail=True)
    except Exception as exc:
        raise StorageError(f"{uri}: {explain(exc, storage)}") from None
    if not listing:
        raise StorageError(f"{uri}: no such file or prefix")
    digest = hashlib.sha256(uri.encode())
    for key in sorted(listing):
        info = listing[key]
        etag = str(info.get("ETag") or info.get("etag") or info.get("mtime") or "")
        digest.update(f"{key}\t{info.get('size')}\t{etag}\n".encode())
    name = storage.root.rsplit("/", 1)[-1]
    target = model_cache_dir() / f"{name}-{digest.hexdigest()[:16]}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        for key in listing:
            rel = key[len(storage.root) :].lstrip("/")
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            storage.fs.get_file(key, str(tmp / rel))
        try:
            tmp.rename(target)
        except OSError:  # another actor on this node finished first
            if not (target / "model_index.json").is_file():
                raise
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(f"{uri}: {explain(exc, storage)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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


def _state_hash(modules: list[Any]) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def folder_weights_hash(path: Path) -> str:
    """sha256 over a model folder's weight files (names and bytes), in a stable order."""
    digest = hashlib.sha256()
    suffixes = (".safetensors", ".bin", ".ckpt", ".pt")
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes):
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


# -- Offline CLIP tokenizer ----------------------------------------------------------


@lru_cache(maxsize=1)
def clip_tokenizer() -> Any:
    """A CLIP BPE tokenizer built offline.

    The real OpenAI CLIP vocabulary (49,408 tokens) ships in the open_clip_torch wheel;
    it is read without importing open_clip. Without that wheel, a byte-level fallback
    (one token per character) keeps everything working with different token ids."""
    from transformers import CLIPTokenizer

    vocab_tokens, merges = _clip_bpe()
    vocab = {token: i for i, token in enumerate(vocab_tokens)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=TEXT_MAX_LENGTH,
    )


def _clip_bpe() -> tuple[list[str], list[tuple[str, str]]]:
    byte_chars = list(_bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    spec = importlib.util.find_spec("open_clip")
    bpe = None
    if spec is not None and spec.submodule_search_locations:
        candidate = (
            Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
        )
        bpe = candidate if candidate.is_file() else None
    if bpe is not None:
        lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")
        # Same slice as OpenAI's CLIP: 49152 - 256 - 2 merges after the header line.
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return vocab, merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))
