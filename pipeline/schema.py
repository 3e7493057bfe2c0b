"""The one contract: what an image request is, and what is recorded for each image.

`ImageRequest` is validated here once, and everything else derives from it: the
manifest's Arrow schema, the metadata row (`ImageRecord`), the errors table, and later
the HTTP models. This module stays light: pydantic and the standard library only
(pyarrow is imported inside the functions that build Arrow schemas), so the CLI and
the validation stage never pay for torch, ray or diffusers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
import types
import typing
from enum import Enum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class Scheduler(str, Enum):
    """Samplers a request may ask for (mapped to diffusers schedulers in the engine)."""

    ddim = "ddim"
    euler = "euler"
    euler_a = "euler_a"
    dpmpp_2m = "dpmpp_2m"


SCHEDULERS = tuple(s.value for s in Scheduler)
# A request without a scheduler gets its model's: flow-matching models have no DDIM.
FAMILY_SCHEDULERS = {"unet": Scheduler.ddim, "sd3": Scheduler.euler, "flux": Scheduler.euler}
# ... and without guidance_scale its model's: FLUX.1-dev's is the distilled guidance input,
# 3.5 in diffusers' FluxPipeline (schnell ignores it), not a CFG weight.
FAMILY_GUIDANCE = {"unet": 7.5, "sd3": 7.0, "flux": 3.5}


class Speed(str, Enum):
    """A request's speed tier: every denoiser step computed, or neighbouring steps' work
    reused (step caching: DeepCache on a UNet, TaylorSeer on SD3/FLUX; a little less exact)."""

    exact = "exact"
    cached = "cached"


class ResizeMode(str, Enum):
    """How an init image becomes the request's size: `fill` covers it (scaled, the overflow
    cropped from the centre), `fit` fits inside it (scaled, centred, padded with white),
    `stretch` scales each side on its own (aspect not kept)."""

    fill = "fill"
    fit = "fit"
    stretch = "stretch"


SEED_LIMIT = 2**63  # seeds are int64 in the manifest: 0 <= seed < SEED_LIMIT

# An id becomes a storage key (`images/<id>.png`): path segments of these characters only.
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._=+-]*"
_ID_SEGMENT = re.compile(f"^{_SEGMENT}$")
ID_PATTERN = f"^{_SEGMENT}(/{_SEGMENT})*$"  # a whole id, as the OpenAPI document states it
MAX_ID_CHARS = 200
DEFAULT_STEPS, DEFAULT_GUIDANCE = 30, 7.5  # a request's defaults, capped by its limits
MAX_LORA_CHARS = 1024  # longest `lora` path or URI
MAX_URI_CHARS = 1024  # longest `init_image` or `mask_image` URI
UPLOAD_PREFIX = "upload:sha256:"  # an init image sent online: named by its content
LORA_SCALE_LIMIT = 10.0  # -LORA_SCALE_LIMIT <= lora_scale <= LORA_SCALE_LIMIT

# A prompt must hold a character that is not blank. Blank is whitespace to Python's
# str.isspace or to JSON Schema's (ECMA-262) \s, so the OpenAPI document's pattern and
# this check agree on every string.
_BLANK = "\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
TEXT_PATTERN = f"[^{_BLANK}]"
_TEXT = re.compile(TEXT_PATTERN)


def _check_unicode(v: str) -> str:
    """`v`, unless it holds a lone surrogate (JSON allows one; no UTF-8 writer does)."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (it holds a lone surrogate)") from None
    return v


def _check_location(v: str, limit: int) -> str:
    """A path or URI: not empty, at most `limit` characters, no control characters."""
    if not v:
        raise ValueError("must not be empty")
    if len(v) > limit:
        raise ValueError(f"is {len(v)} characters long; at most {limit} allowed")
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise ValueError("contains control characters")
    return _check_unicode(v)


def _check_text(v: str, limit: int) -> str:
    """Prompt text: valid Unicode, at most `limit` characters."""
    _check_unicode(v)
    if len(v) > limit:
        raise ValueError(f"is {len(v)} characters long; at most {limit} allowed")
    return v


class RequestLimits(BaseModel):
    """What a deployment accepts; set in the job or serve config (`limits:`)."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(150, ge=1, description="Most denoising steps one image may ask for.")
    max_pixels: int = Field(
        2048 * 2048, ge=64, description="Most pixels (width x height) one image may ask for."
    )
    max_side: int = Field(2048, ge=8, description="Longest width or height accepted.")
    size_multiple: int = Field(8, ge=1, description="Width and height must be multiples of this.")
    max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt, in characters.")
    max_guidance_scale: float = Field(50.0, gt=0, description="Largest guidance_scale accepted.")
    default_scheduler: Scheduler | None = Field(
        None,
        description="The scheduler of requests that name none; default: the model's own (ddim "
        "for UNet models, euler, flow matching, for SD3 and FLUX).",
    )
    default_guidance_scale: float | None = Field(
        None,
        gt=0,
        description="The guidance_scale of requests that give none; default: the model's own "
        "(7.5 for UNet models, 7.0 for SD3 as diffusers' pipeline, 3.5 for FLUX's distilled "
        "guidance).",
    )

    def for_family(self, family: str) -> RequestLimits:
        """These limits for a model of `family`: the family's scheduler and guidance as the
        defaults where none is configured."""
        update: dict[str, Any] = {}
        if self.default_scheduler is None:
            update["default_scheduler"] = FAMILY_SCHEDULERS[family]
        if self.default_guidance_scale is None:
            update["default_guidance_scale"] = FAMILY_GUIDANCE[family]
        return self.model_copy(update=update) if update else self


DEFAULT_LIMITS = RequestLimits()
# Requests read back inside the system (between stages) were checked against the
# job's limits when they came in, and a rule's style suffix may have lengthened them since.
TRUSTED = RequestLimits.model_construct(
    max_steps=10**9, max_pixels=10**18, max_side=10**9, size_multiple=1,
    max_prompt_chars=10**9, max_guidance_scale=float("inf"),
)  # fmt: skip


def request_from_json(text: str) -> ImageRequest:
    """An ImageRequest written by another stage (checked when it came in: limits not again)."""
    return ImageRequest.model_validate_json(text, context={"limits": TRUSTED})


def _limits(info: ValidationInfo) -> RequestLimits:
    ctx = info.context or {}
    return ctx.get("limits") or DEFAULT_LIMITS


class ImageRequest(BaseModel):
    """One image to generate: a manifest row, or one image of an HTTP request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="Unique within a job; becomes the image's key `images/<id>.png`.")
    prompt: str = Field(description="Text the image should show.")
    negative_prompt: str = Field("", description="Text the image should not show.")
    seed: int | None = Field(
        None, description="Seed of this image's noise; derived from `id` when missing."
    )
    steps: int = Field(DEFAULT_STEPS, description="Denoising steps.")
    guidance_scale: float = Field(
        DEFAULT_GUIDANCE, description="Classifier-free guidance scale (1 = off)."
    )
    width: int | None = Field(
        None, description="Image width in pixels; the model's default when missing."
    )
    height: int | None = Field(
        None, description="Image height in pixels; the model's default when missing."
    )
    scheduler: Scheduler = Field(
        Scheduler.ddim,
        description=f"One of {', '.join(SCHEDULERS)}; when missing, the model's own (ddim for "
        "UNet models, euler for SD3 and FLUX: flow matching has no ddim).",
    )
    speed: Speed = Field(
        Speed.exact,
        description="exact (every UNet step computed) or cached (deep features reused across "
        "neighbouring steps: faster, a little less exact; never batched with exact requests).",
    )
    model: str | None = Field(
        None, description="Model the row is meant for; must match the job's model when set."
    )
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Free key/value strings copied to the image's metadata row.",
    )
    lora: str | None = Field(
        None,
        description="A LoRA adapter for the UNet (diffusers/peft format): a .safetensors file "
        "or a folder holding one, a local path or s3:// URI; online only under the server's "
        "lora_roots. Requests with different adapters share engine batches.",
    )
    lora_scale: float = Field(
        1.0,
        description=f"How strongly lora applies (0: not at all; -{LORA_SCALE_LIMIT:g} to "
        f"{LORA_SCALE_LIMIT:g}); unused without lora.",
    )

    init_image: str | None = Field(
        None,
        description="An image to start from (img2img): an s3:// URI, file://, or a path "
        "relative to the manifest; online, the uploaded image. Without width and height the "
        "output takes its size rounded down to a multiple of 8.",
    )
    mask_image: str | None = Field(
        None,
        description="Inpainting: a mask the size of init_image, white where the image is "
        "repainted, black where it is kept; needs init_image.",
    )
    strength: float = Field(
        0.8,
        description="How far from init_image the result may go (0 < strength <= 1): "
        "int(steps * strength) of the steps run; unused without init_image.",
    )
    resize: ResizeMode = Field(
        ResizeMode.fill,
        description="How init_image (and mask_image) become width x height when the request "
        "gives a size: fill (cover, centre crop), fit (inside, padded) or stretch.",
    )

    @field_validator("id")
    @classmethod
    def _check_id(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty")
        if len(v) > MAX_ID_CHARS:
            raise ValueError(f"is {len(v)} characters long; at most {MAX_ID_CHARS} allowed")
        if any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError("contains control characters")
        if "\\" in v:
            raise ValueError("contains a backslash; use '/' to nest ids")
        if v.startswith("/"):
            raise ValueError("is an absolute path; ids are relative keys under the output prefix")
        for segment in v.split("/"):
            if segment in ("", ".", ".."):
                raise ValueError(
                    f"has the path segment {segment!r}, which would escape or alias the output prefix"
                )
            if not _ID_SEGMENT.match(segment):
                raise ValueError(
                    "may only use letters, digits and . _ = + - in '/'-separated segments "
                    "that start with a letter or digit"
                )
        return v

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: str, info: ValidationInfo) -> str:
        if not _TEXT.search(v):
            raise ValueError("must not be empty")
        return _check_text(v, _limits(info).max_prompt_chars)

    @field_validator("negative_prompt")
    @classmethod
    def _check_negative_prompt(cls, v: str, info: ValidationInfo) -> str:
        return _check_text(v, _limits(info).max_prompt_chars)

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, v: dict[str, str]) -> dict[str, str]:
        for text in (*v, *v.values()):
            _check_unicode(text)
        return v

    @field_validator("lora")
    @classmethod
    def _check_lora(cls, v: str | None) -> str | None:
        return None if v is None else _check_location(v, MAX_LORA_CHARS)

    @field_validator("init_image", "mask_image")
    @classmethod
    def _check_image_uri(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty")
        return None if v is None else _check_location(v, MAX_URI_CHARS)

    @field_validator("strength")
    @classmethod
    def _check_strength(cls, v: float) -> float:
        if not 0 < v <= 1:  # NaN fails both comparisons
            raise ValueError(f"{v} is out of range; use 0 < strength <= 1")
        return v

    @field_validator("lora_scale")
    @classmethod
    def _check_lora_scale(cls, v: float) -> float:
        if not -LORA_SCALE_LIMIT <= v <= LORA_SCALE_LIMIT:  # NaN fails both comparisons
            raise ValueError(
                f"{v} is out of range; use {-LORA_SCALE_LIMIT:g} <= lora_scale <= {LORA_SCALE_LIMIT:g}"
            )
        return v

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v < SEED_LIMIT:
            raise ValueError(f"{v} is out of range; use 0 <= seed < 2**63")
        return v

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, v: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_steps
        if not 1 <= v <= limit:
            raise ValueError(f"{v} is out of range; use 1 <= steps <= {limit}")
        return v

    @field_validator("guidance_scale")
    @classmethod
    def _check_guidance(cls, v: float, info: ValidationInfo) -> float:
        limit = _limits(info).max_guidance_scale
        if not 0 <= v <= limit:  # NaN fails both comparisons
            raise ValueError(f"{v} is out of range; use 0 <= guidance_scale <= {limit}")
        return v

    @field_validator("width", "height")
    @classmethod
    def _check_side(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is None:
            return v
        limits = _limits(info)
        if not limits.size_multiple <= v <= limits.max_side:
            raise ValueError(f"{v} is out of range; use {limits.size_multiple}..{limits.max_side}")
        if v % limits.size_multiple:
            raise ValueError(f"{v} is not a multiple of {limits.size_multiple}")
        return v

    @model_validator(mode="after")
    def _check_pixels(self, info: ValidationInfo) -> ImageRequest:
        if self.width is not None and self.height is not None:
            limit = _limits(info).max_pixels
            if self.width * self.height > limit:
                # Whole-request checks carry their field names as a "fields: " prefix.
                raise ValueError(
                    f"width,height: {self.width}x{self.height} is {self.width * self.height} "
                    f"pixels; at most {limit} allowed"
                )
        if self.mask_image is not None and self.init_image is None:
            raise ValueError("mask_image: needs init_image (the image the mask applies to)")
        if self.init_image is not None and int(self.steps * self.strength) < 1:
            raise ValueError(f"strength: {self.strength} of {self.steps} steps runs no step; use "
                             f"strength >= {1 / self.steps:.3g} or more steps")  # fmt: skip
        return self

    @property
    def sized_by_image(self) -> bool:
        """The output takes the init image's size (rounded down to a multiple of 8)."""
        return self.init_image is not None and self.width is None and self.height is None

    @property
    def resolved_seed(self) -> int:
        """The seed used: the given one, or one derived from the id (stable across runs)."""
        return self.seed if self.seed is not None else seed_from_id(self.id)

    def resolved_size(self, default_side: int) -> tuple[int, int]:
        """(width, height) made: the request's, the model's native side filling what is missing."""
        return self.width or default_side, self.height or default_side

    def fingerprint(self, width: int, height: int, layers: str | None = None) -> str:
        """A digest of everything that decides this request's pixels at a resolved size.

        `metadata` and `model` are left out: the first never changes an image, the second is
        compared on its own (model name and weights hash). `lora` counts by its path (a rerun
        compares fingerprints from the manifest alone, without reading adapters), `lora_scale`
        only with a lora, so requests without one keep the fingerprints they had. An init
        image counts by its URI, with the mask, strength and resize mode (online uploads are
        named by their content's sha256); sized by the image, the size is "init_image".
        `layers`: the stamp of the composite layers placed on it (pipeline/composite.py's
        `LayersStamp`: the config and the metadata its templates read), when there are any."""
        fields = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.resolved_seed,
            "steps": self.steps,
            "guidance_scale": float(self.guidance_scale),
            "width": width,
            "height": height,
            "scheduler": self.scheduler.value,
        }
        if self.speed is not Speed.exact:  # exact requests keep the fingerprints they had
            fields["speed"] = self.speed.value
        if self.lora is not None:
            fields["lora"] = self.lora
            fields["lora_scale"] = float(self.lora_scale)
        if self.init_image is not None:
            fields.update(init_image=self.init_image, mask_image=self.mask_image,
                          strength=float(self.strength), resize=self.resize.value)  # fmt: skip
            if self.sized_by_image:  # a rerun computes it from the manifest, unread
                fields["width"] = fields["height"] = "init_image"
                del fields["resize"]  # unused: nothing is resized
        if layers is not None:
            fields["layers"] = layers
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


BucketKey = tuple[int, int, int, str, str]  # width, height, steps, scheduler, speed


def bucket_key(request: ImageRequest, default_side: int) -> BucketKey:
    """Requests with equal keys can share one denoising loop (size, steps, scheduler, speed
    tier: exact and cached requests never share a batch)."""
    width, height = request.resolved_size(default_side)
    return width, height, request.steps, request.scheduler.value, request.speed.value


def seed_from_id(request_id: str) -> int:
    """A seed derived from an id: the same on every machine, in every run."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") >> 1


class FieldError(BaseModel):
    """Why one field of a request was rejected."""

    field: str
    reason: str


def validate_request(
    row: dict[str, Any], limits: RequestLimits = DEFAULT_LIMITS
) -> ImageRequest | list[FieldError]:
    """An `ImageRequest` from a row, or the list of field errors that prevent one.

    Null values count as missing, so Parquet nulls take the defaults (steps and guidance
    capped by `limits`: a deployment with max_steps 4 makes 4 steps, not 30); an Arrow map
    (a list of key/value pairs in Python) is accepted for `metadata`."""
    clean = {k: v for k, v in row.items() if v is not None}
    clean.setdefault("steps", min(DEFAULT_STEPS, limits.max_steps))
    guidance = getattr(limits, "default_guidance_scale", None) or DEFAULT_GUIDANCE
    clean.setdefault("guidance_scale", min(guidance, limits.max_guidance_scale))
    if getattr(limits, "default_scheduler", None) is not None:
        clean.setdefault("scheduler", limits.default_scheduler.value)
    if isinstance(clean.get("metadata"), list):
        try:
            clean["metadata"] = dict(clean["metadata"])
        except (TypeError, ValueError):
            pass  # left as is: validation names the field
    try:
        request = ImageRequest.model_validate(clean, context={"limits": limits})
    except ValidationError as exc:
        return [field_error(err) for err in exc.errors()]
    return request


def field_error(err: Any) -> FieldError:
    """A `FieldError` from one pydantic error dict."""
    field = ".".join(str(p) for p in err["loc"])
    reason = _reason(err)
    if not field:  # a whole-request check: "fields: reason"
        field, _, reason = reason.partition(": ")
    return FieldError(field=field, reason=reason)


def _reason(err: Any) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    shown = repr(err.get("input"))
    if len(shown) > 80:
        shown = shown[:77] + "..."
    if kind in ("enum", "literal_error"):
        expected = (err.get("ctx") or {}).get("expected", "")
        return f"{shown} is not valid; use one of {expected.replace(' or ', ', ')}".rstrip("; ")
    if kind == "value_error":
        if not err["loc"] or msg[:1].isdigit() or msg[:1] == "-":
            return msg
        return f"{shown} {msg}"
    return f"{shown}: {msg}"


class StageTimings(BaseModel):
    """Seconds spent on one image per stage; a batch's time is shared among its images."""

    text_encode_s: float = 0.0
    denoise_s: float = 0.0
    vae_decode_s: float = 0.0
    encode_png_s: float = 0.0
    write_s: float = 0.0


@dataclasses.dataclass
class GeneratedImage:
    """One image out of the engine and how it was made (raw pixels: nothing encoded yet)."""

    request: ImageRequest
    image: Any  # np.ndarray [H, W, 3] uint8
    seed: int
    width: int
    height: int
    batch_size: int  # images denoised together with this one
    scheduler_config: str  # JSON
    timings: StageTimings  # this image's share of its chunk's time
    cache_source: str | None = None  # read from the result cache: the entry's key
    cache_similarity: float | None = None  # a semantic-cache hit: its prompt's similarity
    made_by: dict[str, Any] | None = None  # a cache hit: the provenance of what made it
    prompt_vector: Any = None  # the semantic cache's unit vector of the prompt (np.float16)
    lora_sha256: str | None = None  # the adapter file it was made with (the audit trail)
    inputs: dict[str, Any] | None = None  # made from an image: ImageRecord's init_* fields


class EngineRow(BaseModel):
    """One row out of the batch job's engine stage: an image's raw pixels, or why there is none.

    The Arrow schema between the engine actors and the write tasks derives from it."""

    id: str
    request: str | None  # ImageRequest JSON; None for a row that failed validation
    row: str | None  # the manifest row as JSON (for the errors table)
    cache_key: str | None = None  # a result-cache hit: the write stage reads this entry
    cache_source: str | None = None  # a semantic-cache hit's entry (the engine read it)
    cache_similarity: float | None = None
    prompt_vector: bytes | None = None  # float16: the write stage indexes the image with it
    lora_sha256: str | None = None
    inputs: str | None = None  # JSON: the init image's provenance (GeneratedImage.inputs)
    error_stage: str | None = None
    error_field: str | None = None
    error_reason: str | None = None
    pixels: bytes | None = None  # [height, width, 3] uint8, row-major
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    batch_size: int | None = None
    scheduler_config: str | None = None
    timings: StageTimings | None = None
    # The engine actor's busy time so far (its busy fraction = busy_s / (until - since)).
    engine_busy_s: float | None = None  # seconds inside generate, this call included
    engine_since: float | None = None  # Unix time its first call started
    engine_until: float | None = None  # Unix time this call ended
    # Provenance of the engine actor.
    model: str
    weights_hash: str
    backend: dict[str, str]
    node_id: str
    actor_id: str


class ImageRecord(BaseModel):
    """One metadata row per finished image: the request and its full provenance."""

    # The request, with defaults resolved to the values actually used.
    id: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    model: str
    metadata: dict[str, str]
    speed: str = Speed.exact.value  # the speed tier it was made in
    lora: str | None = None  # the LoRA adapter it was made with (ImageRequest.lora)
    lora_scale: float = 1.0  # and its scale (unused without lora)
    # The output.
    uri: str
    sha256: str
    request_fingerprint: str  # ImageRequest.fingerprint: a rerun compares it with the manifest's
    # Provenance.
    weights_hash: str
    scheduler_config: str  # JSON of the diffusers scheduler config
    backend: dict[str, str]  # device, dtype, attention, unet
    batch_size: int
    daguerre_version: str
    timings: StageTimings
    node_id: str
    actor_id: str
    run_id: str  # the job run (or Serve deployment) that wrote this row; later runs supersede
    created_at: dt.datetime
    client_id: str | None = None  # online: the id the client sent (the stored id is namespaced)
    watermark: str | None = None  # the invisible watermark's payload in the file (marks:)
    format: str = "png"  # the master file's format (encoding.format): png, webp or jpeg
    variants: dict[str, str] = {}  # resized variants (encoding.variants): name -> uri
    content_credentials: bool = False  # a signed C2PA manifest is embedded in the files
    cache_hit: bool = False  # answered from the result cache (cache:) instead of generated
    cache_source: str | None = None  # on a hit: the cache entry's key (weights + request)
    cache_similarity: float | None = None  # a semantic-cache hit: prompt cosine similarity
    lora_sha256: str | None = None  # sha256 of the LoRA file the image was made with
    # Images in (null for text-only requests): the source photo, the mask, how they were used.
    init_image: str | None = None  # its URI (online: upload:sha256:<hex>)
    init_sha256: str | None = None  # sha256 of the file as read
    mask_image: str | None = None
    mask_sha256: str | None = None
    strength: float | None = None
    resize: str | None = None  # how they became the output's size (null: sized by the image)
    steps_run: int | None = None  # denoising steps actually run: int(steps * strength)
    composite: str | None = None  # JSON: the layers placed over the image (composite:)
    status: Literal["ok"] = "ok"  # failures go to the errors table, never here
    error: str | None = None


class ErrorRecord(BaseModel):
    """One row of the errors table: a request that produced no image, and why."""

    id: str
    stage: Literal["validate", "rules", "generate", "quality", "composite", "write"]
    field: str
    reason: str
    row: str  # the offending row as JSON, truncated
    uri: str | None = None  # stage quality with quality.keep_rejected: the image kept aside
    run_id: str  # the run that recorded it; a later run's rows for the same id supersede it
    created_at: dt.datetime


# -- Arrow schemas, derived from the models above --------------------------------------


def arrow_schema(model: type[BaseModel], required: set[str] | None = None) -> Any:
    """The Arrow schema for a pydantic model; fields in `required` (default all) are non-null."""
    import pyarrow as pa

    fields = []
    for name, info in model.model_fields.items():
        arrow_type, optional = _arrow_type(info.annotation)
        nullable = optional or (required is not None and name not in required)
        fields.append(pa.field(name, arrow_type, nullable=nullable))
    return pa.schema(fields)


def manifest_schema() -> Any:
    """Arrow schema of a manifest: `ImageRequest`'s fields, only `id` and `prompt` required."""
    return arrow_schema(ImageRequest, required={"id", "prompt"})


def record_schema() -> Any:
    """Arrow schema of the metadata table (`ImageRecord`). Columns with a default are
    nullable: fragments written before a column existed read it as nulls (and compaction
    merges them with newer ones)."""
    required = {name for name, info in ImageRecord.model_fields.items() if info.is_required()}
    return arrow_schema(ImageRecord, required=required)


def error_schema() -> Any:
    """Arrow schema of the errors table (`ErrorRecord`)."""
    return arrow_schema(ErrorRecord)


def engine_row_schema() -> Any:
    """Arrow schema of the engine stage's output (`EngineRow`)."""
    return arrow_schema(EngineRow, required={"id"})


def _arrow_type(annotation: Any) -> tuple[Any, bool]:
    import pyarrow as pa

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner, _ = _arrow_type(args[0])
        return inner, len(args) < len(typing.get_args(annotation))
    if origin is Literal:
        return pa.string(), False
    if origin is dict:
        key, value = typing.get_args(annotation)
        return pa.map_(_arrow_type(key)[0], _arrow_type(value)[0]), False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct(
            [pa.field(n, _arrow_type(f.annotation)[0]) for n, f in annotation.model_fields.items()]
        ), False
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return pa.string(), False
    simple = {
        str: pa.string(),
        bytes: pa.binary(),
        int: pa.int64(),
        float: pa.float64(),
        bool: pa.bool_(),
        dt.datetime: pa.timestamp("us", tz="UTC"),
    }
    if annotation in simple:
        return simple[annotation], False
    raise TypeError(f"no Arrow type for {annotation!r}")
