"""Per-request LoRA adapters on the engine's UNet: located, validated, cached, routed per sample.

A request names `lora` (a diffusers/peft-format LoRA: a .safetensors file, or a folder
holding one; a local path or an s3:// URI) and `lora_scale`. Requests with different
adapters, or none, share one engine batch: the bucket key never holds the adapter.

Routing. peft's mixed-batch path (`LoraLayer._mixed_batch_forward`) runs each adapter on
the rows that name it. For one denoising loop every LoRA layer of the UNet gets a forward
pre-hook passing `adapter_names`, one name per row of the UNet batch (classifier-free
guidance doubles it: the uncond half, then the cond half, each request's name in both);
a request without lora is peft's "__base__" row. peft does the same with
`_enable_peft_forward_hooks`, which diffusers' UNet (no PeftModel around it) does not
have. Outside that loop the adapters are disabled, so any other UNet call (benchmarks,
graph export) sees the base model.

Scale. peft keeps one scaling per adapter name, and its mixed batch has no per-row scale,
so each (adapter file, scale) pair is its own peft adapter, named from the file's sha256
and the scale (`lora_<digest>`), whose scaling is `lora_scale * alpha / r`. The same
file at two scales is loaded twice; adapters are small next to the UNet.

Cache. At most `EngineConfig.lora_cache_size` adapters stay loaded per engine (LRU);
evicting deletes the adapter's layers from the UNet. One engine batch never names more
adapters than that (the engine splits a batch that would), so a batch's adapters are
loaded together. A local file is hashed again when its size or mtime changes; an s3://
adapter is fetched once per node into $DAGUERRE_CACHE/loras (keyed by its URI, size and
ETag) and taken as unchanging for the engine's life: publish a new version under a new key.

What is refused, per request with one line naming `lora`: a missing path, a file that is
not safetensors (pickled .bin/.pt files run code when loaded) or does not parse, keys that
name no module of this UNet or shapes that do not fit it, non-finite weights, DoRA (peft's
mixed batch does not support it), and any adapter on an engine whose UNet is compiled
(torch.compile, ONNX Runtime, TensorRT), has fused q/k/v projections or is quantized: a
compiled graph cannot route rows through adapters, fused projections would silently skip
weights aimed at q, k and v, and 8-bit layers are untested here.

UNet only: text-encoder weights in a file (`text_encoder.*`, kohya `lora_te*`) are
ignored, with a warning logged once per file; a file with no UNet weights is refused.

Light to import: torch, peft, safetensors and diffusers load inside the functions that
use them (the ingress imports this module to check `lora_roots`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import RequestRefused

if TYPE_CHECKING:
    from .config import StorageConfig
    from .schema import ImageRequest

logger = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for a row that takes no adapter
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig JSON in the safetensors header
_TEXT_ENCODER = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_")
_KOHYA = ("lora_unet_", *_TEXT_ENCODER[2:])
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")
_FILES_KEPT = 256  # located adapter files remembered per engine (path -> sha256)


class LoraError(RequestRefused):
    """A request's adapter that cannot be used: one line naming `lora`, the value and why."""

    def __init__(self, spec: str, reason: str):
        ValueError.__init__(self, f"lora {spec!r}: {reason}")
        self.field, self.spec, self.reason = "lora", spec, reason

    def __reduce__(self):  # crosses Ray's process boundaries with its two arguments
        return (LoraError, (self.spec, self.reason))

    @property
    def detail(self) -> str:
        return str(self)  # names the adapter: lora '/path': why


@dataclass(frozen=True)
class AdapterFile:
    """A located adapter: the request's `lora`, its local .safetensors file, and its sha256."""

    spec: str
    path: Path
    sha256: str


def adapter_name(sha256: str, scale: float) -> str:
    """The peft adapter name of one (file content, scale) pair (no dots: a module key)."""
    return "lora_" + hashlib.sha256(f"{sha256}:{float(scale)!r}".encode()).hexdigest()[:20]


# -- where an adapter may be named from (online) --------------------------------------------


def under_roots(spec: str, roots: list[str]) -> bool:
    """Whether `spec` lies under one of `roots` (folders or s3:// prefixes): local paths are
    compared after resolving symlinks and `..`; URIs must share a root's scheme and prefix
    at a `/` boundary and hold no `.` or `..` segment."""
    if "://" in spec and not spec.startswith("file://"):
        rest = spec.partition("://")[2]
        if any(part in (".", "..") for part in rest.split("/")):
            return False
        for root in roots:
            if "://" not in root or root.startswith("file://"):
                continue
            prefix = root.rstrip("/")
            if spec == prefix or spec.startswith(prefix + "/"):
                return True
        return False
    path = spec.removeprefix("file://")
    if not os.path.isabs(path):
        return False
    real = os.path.realpath(path)
    for root in roots:
        if "://" in root and not root.startswith("file://"):
            continue
        base = os.path.realpath(root.removeprefix("file://"))
        if os.path.commonpath([real, base]) == base:
            return True
    return False


# -- locating and reading a file -------------------------------------------------------------


def _pick(spec: str, names: list[str]) -> str:
    """The adapter file among a folder's file names: diffusers' name, or the only .safetensors."""
    tensors = sorted(n for n in names if n.endswith(".safetensors"))
    if WEIGHT_NAME in tensors:
        return WEIGHT_NAME
    if len(tensors) == 1:
        return tensors[0]
    if not tensors:
        pickled = [n for n in names if n.endswith((".bin", ".pt", ".ckpt"))]
        extra = " (pickled .bin/.pt/.ckpt files are never loaded)" if pickled else ""
        raise LoraError(spec, f"the folder holds no .safetensors file{extra}")
    raise LoraError(spec, f"the folder holds several .safetensors files ({', '.join(tensors)}); "
                    "name one")  # fmt: skip


def local_file(spec: str) -> Path:
    """The .safetensors file a local `lora` names (the file, or the one in its folder)."""
    path = Path(spec.removeprefix("file://")).expanduser()
    if path.is_dir():
        return path / _pick(spec, [p.name for p in path.iterdir() if p.is_file()])
    if not path.exists():
        raise LoraError(spec, "no such file or folder")
    if path.suffix != ".safetensors":
        raise LoraError(spec, "is not a .safetensors file (pickled .bin/.pt files are never "
                        "loaded: they can run code)")  # fmt: skip
    return path


def adapter_stamp(spec: str, storage_config: StorageConfig | None = None) -> str | None:
    """What tells two versions of the adapter `spec` apart without reading it: the file's
    path, size and modification time (an object's ETag); None when it cannot be found."""
    from .storage import Storage, is_remote

    try:
        if not is_remote(spec):
            path = local_file(spec).resolve()
            return f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
        storage = Storage(spec, storage_config)
        info = storage.fs.info(storage.root)
        if info.get("type") != "file":
            listing = storage.fs.ls(storage.root, detail=True)
            files = {posixpath.basename(i["name"]): i for i in listing if i.get("type") == "file"}
            info = files[_pick(spec, list(files))]
        return f"{info['name']}:{info.get('size')}:{info.get('ETag') or info.get('mtime')}"
    except Exception:  # missing, unreadable: the engine says why; the cache stays out of it
        return None


def fetch_remote(spec: str, storage_config: StorageConfig | None = None) -> Path:
    """A local copy of the adapter at an s3:// (or other fsspec) URI: the object itself, or
    the one .safetensors under the prefix; fetched once per node, URI, size and ETag."""
    import uuid

    from ..kernels.unet import cache_root
    from .storage import Storage, explain

    storage = Storage(spec, storage_config)
    try:
        info = storage.fs.info(storage.root)
        if info.get("type") != "file":
            listing = storage.fs.ls(storage.root, detail=True)
            files = {posixpath.basename(i["name"]): i for i in listing if i.get("type") == "file"}
            info = files[_pick(spec, list(files))]
        elif not storage.root.endswith(".safetensors"):
            raise LoraError(spec, "is not a .safetensors object (pickled .bin/.pt files are "
                            "never loaded: they can run code)")  # fmt: skip
        etag = str(info.get("ETag") or info.get("etag") or info.get("mtime") or "")
        key = hashlib.sha256(f"{spec}\t{info['name']}\t{info.get('size')}\t{etag}".encode())
        target = cache_root() / "loras" / f"{key.hexdigest()[:24]}.safetensors"
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            storage.fs.get_file(info["name"], str(tmp))
            tmp.replace(target)  # atomic: a concurrent engine on this node reads whole files
        finally:
            tmp.unlink(missing_ok=True)
        return target
    except LoraError:
        raise
    except FileNotFoundError:
        raise LoraError(spec, "no such object or prefix") from None
    except Exception as exc:
        raise LoraError(spec, explain(exc, storage)) from None


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_adapter(file: AdapterFile) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The file's tensors and diffusers' adapter metadata (LoraConfig fields, keys prefixed
    by component, e.g. `unet.lora_alpha`), or LoraError when it does not parse."""
    from safetensors import safe_open

    from .config import first_line

    try:
        with safe_open(str(file.path), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        reason = f"is not a readable safetensors file ({first_line(exc)})"
        raise LoraError(file.spec, reason) from None
    raw = header.get(METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else None
    except ValueError:
        raise LoraError(file.spec, f"its {METADATA_KEY} header is not JSON") from None
    if not tensors:
        raise LoraError(file.spec, "holds no tensors")
    return tensors, metadata if isinstance(metadata, dict) else None


def unet_weights(
    file: AdapterFile, tensors: dict[str, Any], unet_config: Any
) -> tuple[dict[str, Any], dict[str, float] | None]:
    """The UNet's LoRA weights in peft format, keyed `unet.<module>.lora_A|B.weight` (kohya
    and older diffusers layouts converted, text-encoder weights dropped), and kohya's network
    alphas when the file has them."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft

    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in tensors):
        raise LoraError(file.spec, "is a DoRA adapter; only plain LoRA mixes in one batch")
    alphas = None
    if all(k.startswith(_KOHYA) for k in tensors):
        try:
            tensors, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(
                dict(tensors), unet_config=unet_config
            )
        except Exception as exc:
            raise LoraError(file.spec, f"kohya-format keys that do not convert ({exc})") from None
    dropped = [k for k in tensors if k.startswith(_TEXT_ENCODER)]
    if dropped:
        logger.warning("lora %s: %d text-encoder weights ignored (UNet LoRA only)", file.spec,
                       len(dropped))  # fmt: skip
    unet = {k: v for k, v in tensors.items() if k.startswith("unet.")}
    rest = {k: v for k, v in tensors.items() if not k.startswith(("unet.", *_TEXT_ENCODER))}
    if not unet and rest:  # a bare peft state dict (get_peft_model_state_dict of a UNet)
        unet, rest = {f"unet.{k}": v for k, v in rest.items()}, {}
    if rest:
        raise LoraError(file.spec, f"has keys for no known component, e.g. {next(iter(rest))!r}")
    if not unet:
        raise LoraError(file.spec, "holds no UNet LoRA weights (text-encoder LoRA is not used)")
    if not any(".lora_A." in k or ".lora_B." in k for k in unet):  # diffusers' older layout
        unet = convert_unet_state_dict_to_peft(unet)
    return unet, alphas


def check_fits(file: AdapterFile, weights: dict[str, Any], unet: Any) -> None:
    """LoraError unless every weight is a finite lora_A/lora_B of a Linear or Conv2d of
    `unet` with matching in/out sizes."""
    import torch

    modules = dict(unet.named_modules())
    for key, tensor in weights.items():
        match = _PEFT_KEY.match(key.removeprefix("unet."))
        if match is None:
            reason = f"{key!r} is not a LoRA weight (<module>.lora_A.weight or .lora_B.weight)"
            raise LoraError(file.spec, reason)
        module = modules.get(match["module"])
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Linear):
            sizes = base.in_features, base.out_features
        elif isinstance(base, torch.nn.Conv2d):
            sizes = base.in_channels, base.out_channels
        else:
            raise LoraError(file.spec, f"{match['module']!r} is no Linear or Conv2d of this "
                            "model's UNet (an adapter for another model?)")  # fmt: skip
        # lora_A: [r, in, ...] reads the layer's input; lora_B: [out, r, ...] writes its output
        fits = tensor.ndim >= 2 and (
            tensor.shape[1] == sizes[0] if match["part"] == "A" else tensor.shape[0] == sizes[1]
        )
        if not fits:
            raise LoraError(file.spec, f"{key!r} has shape {tuple(tensor.shape)}, which does not "
                            f"fit {match['module']!r} (an adapter for another model?)")  # fmt: skip
        if not torch.isfinite(tensor).all():
            raise LoraError(file.spec, f"{key!r} holds NaN or infinite values")


# -- the adapters of one engine --------------------------------------------------------------


class LoraAdapters:
    """The adapters loaded into one engine's UNet: an LRU of at most `capacity`, and the
    per-row routing of one denoising loop. `refusal`: why this engine cannot take adapters
    at all (its UNet backend or hot path), or None."""

    def __init__(self, unet: Any, capacity: int, storage_config: StorageConfig | None = None,
                 refusal: str | None = None):  # fmt: skip
        self.unet, self.capacity = unet, capacity
        self.storage_config, self.refusal = storage_config, refusal
        self.loaded: OrderedDict[str, AdapterFile] = OrderedDict()  # adapter name -> its file
        # spec -> (its local stamp: path, size, mtime; None on s3) and the located file
        self._files: OrderedDict[str, tuple[Any, AdapterFile]] = OrderedDict()
        self._layers: list[Any] = []  # the UNet's peft LoRA layers
        self.loads = self.evictions = 0

    def names(self, requests: list[ImageRequest]) -> list[str]:
        """Per request, its adapter's name in the UNet ("__base__" without lora), loading the
        missing ones (evicting the least recently used). LoraError for the first that fails."""
        names, wanted = [], {}
        for request in requests:
            if request.lora is None:
                names.append(BASE)
                continue
            file = self.locate(request.lora)
            name = adapter_name(file.sha256, request.lora_scale)
            wanted[name] = (file, request.lora_scale)
            names.append(name)
        if len(wanted) > self.capacity:
            raise ValueError(f"{len(wanted)} LoRA adapters in one engine batch; at most "
                             f"lora_cache_size ({self.capacity})")  # fmt: skip
        for name in wanted:
            if name in self.loaded:
                self.loaded.move_to_end(name)
        for name, (file, scale) in wanted.items():
            if name not in self.loaded:
                self._make_room(keep=wanted)
                self._load(name, file, scale)
        return names

    def locate(self, spec: str) -> AdapterFile:
        """The adapter file `spec` names, hashed once per (local) size and mtime."""
        if self.refusal:
            raise LoraError(spec, self.refusal)
        from .storage import is_remote

        remote = is_remote(spec)
        path = None if remote else local_file(spec)
        stamp = None if remote else (str(path), path.stat().st_size, path.stat().st_mtime_ns)
        known = self._files.get(spec)
        if known is not None and known[0] == stamp:
            self._files.move_to_end(spec)
            return known[1]
        path = fetch_remote(spec, self.storage_config) if remote else path
        file = AdapterFile(spec, path, file_sha256(path))
        self._files[spec] = (stamp, file)
        while len(self._files) > _FILES_KEPT:
            self._files.popitem(last=False)
        return file

    def _load(self, name: str, file: AdapterFile, scale: float) -> None:
        from peft.tuners.lora import LoraLayer

        from .config import first_line

        tensors, metadata = read_adapter(file)
        weights, alphas = unet_weights(file, tensors, self.unet.config)
        check_fits(file, weights, self.unet)
        try:
            with warnings.catch_warnings():  # peft warns at every adapter after the first
                warnings.filterwarnings("ignore", "Already found a `peft_config`")
                self.unet.load_lora_adapter(weights, prefix="unet", adapter_name=name,
                                            network_alphas=None if metadata else alphas,
                                            metadata=metadata)  # fmt: skip
        except Exception as exc:
            reason = f"does not load into this UNet ({first_line(exc)})"
            raise LoraError(file.spec, reason) from None
        self._layers = [m for m in self.unet.modules() if isinstance(m, LoraLayer)]
        for layer in self._layers:
            layer.set_scale(name, scale)  # lora_scale x alpha / r; layers without it ignore it
        self.unet.disable_adapters()  # only routed loops use adapters
        self.loaded[name] = file
        self.loads += 1
        logger.info("lora %s (sha256 %s, scale %s) loaded as %s", file.spec, file.sha256[:12],
                    scale, name)  # fmt: skip

    def _make_room(self, keep: dict[str, Any]) -> None:
        """Delete least recently used adapters (not in `keep`) until one more fits."""
        while len(self.loaded) >= self.capacity:
            victim = next((n for n in self.loaded if n not in keep), None)
            if victim is None:
                return
            self.unet.delete_adapters(victim)
            del self.loaded[victim]
            self.evictions += 1

    @contextmanager
    def routed(self, names: list[str]) -> Iterator[None]:
        """Within it every UNet call runs row i through adapter `names[i]` (one per row of
        the UNet batch: [2B] with CFG); with only "__base__" names nothing is hooked."""
        if all(n == BASE for n in names):
            yield
            return

        def inject(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            kwargs["adapter_names"] = names
            return args, kwargs

        handles = [layer.register_forward_pre_hook(inject, with_kwargs=True)
                   for layer in self._layers]  # fmt: skip
        self.unet.enable_adapters()
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.unet.disable_adapters()
