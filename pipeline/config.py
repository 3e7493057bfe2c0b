"""Configuration of the engine and of batch jobs: pydantic models loaded from YAML.

Unknown keys are rejected with the key named, so a typo never silently falls back to
a default. Light to import (no torch, ray or diffusers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from ..kernels.attention import AttentionBackend
from ..kernels.quantize import QUANTIZABLE_UNET_BACKENDS, Quantization
from ..kernels.unet import UNetBackend
from .composite import CompositeConfig
from .credentials import CredentialsConfig
from .formats import EncodingConfig
from .marks import MarksConfig
from .quality import QualityConfig
from .result_cache import CacheConfig
from .rules import PromptRules
from .schema import RequestLimits, field_error

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message says where and why."""


class RequestRefused(ValueError):
    """One request this engine cannot make, said in one line naming the request field at
    fault (the errors table's `field`; online, a 400 naming it): the request fails alone."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason

    def __reduce__(self):  # crosses Ray's process boundaries with its two arguments
        return (type(self), (self.field, self.reason))

    @property
    def detail(self) -> str:
        """The reason as shown beside the field (an errors row, a 400's `fields`)."""
        return self.reason


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class StorageConfig(BaseModel):
    """How to reach object storage (s3://). Anything left unset comes the standard AWS ways:
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/config."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(
        None,
        description="S3 endpoint, e.g. http://127.0.0.1:8333 (default: AWS or AWS_ENDPOINT_URL).",
    )
    region: str | None = Field(None, description="S3 region (default: AWS_REGION / profile).")
    profile: str | None = Field(None, description="A profile of ~/.aws/credentials and config.")
    access_key_id: SecretStr | None = Field(
        None, description="Prefer the environment or a profile."
    )
    secret_access_key: SecretStr | None = Field(None, description="Never logged or echoed.")
    anon: bool = Field(False, description="Unsigned requests (public buckets).")
    connect_timeout_s: float = Field(10, gt=0, description="Seconds to wait for a connection.")
    read_timeout_s: float = Field(
        60, gt=0, description="Seconds to wait for a reply before the request is tried again."
    )
    max_attempts: int = Field(5, ge=1, description="Tries per request (botocore retries).")


CompileMode = Literal[
    "auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
]  # torch.compile's modes; auto: max-autotune on GPU, default on CPU
COMPILE_MODES = get_args(CompileMode)


class EngineConfig(BaseModel):
    """How one `DiffusionEngine` runs its model."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "tiny", description="A preset name (tiny, small, sd15, sdxl) or a diffusers model folder."
    )
    device: str = Field(
        "auto", description="'auto' (cuda when present, else cpu), 'cpu', 'cuda' or 'cuda:N'."
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="'auto' is float16 on CUDA and float32 on CPU."
    )
    attention_backend: AttentionBackend = Field(
        AttentionBackend.auto,
        description="Attention inside the UNet (kernels/attention.py); an unavailable one falls "
        "back to sdpa with a warning. auto: on CUDA the fastest per shape (timed once), "
        "elsewhere sdpa. DAGUERRE_ATTENTION_BACKEND overrides it.",
    )
    unet_backend: UNetBackend = Field(
        UNetBackend.auto,
        description="How the UNet runs (kernels/compile.py): eager torch, torch.compile, ONNX "
        "Runtime or TensorRT; compiled graphs are cached under $DAGUERRE_CACHE. auto: on a GPU "
        "the fastest in this machine's last `daguerre bench` of the model, else eager.",
    )
    compile_mode: CompileMode = Field(
        "auto",
        description="unet_backend compile: torch.compile's mode. auto: max-autotune (with CUDA "
        "graphs) on GPU, default on CPU; reduce-overhead: CUDA graphs without autotuning.",
    )
    max_batch_size: int = Field(
        8, ge=1, description="Most images denoised together in one UNet call (before CFG doubling)."
    )
    fuse_qkv: bool = Field(
        False,
        description="Hot path: one matmul for q, k and v in self-attention (k and v in "
        "cross-attention) instead of three.",
    )
    channels_last: bool = Field(
        False, description="Hot path: the UNet and VAE in channels-last memory format."
    )
    quantize: Quantization = Field(
        Quantization.none,
        description="8-bit UNet (kernels/quantize.py, torchao): none, int8 (dynamic, any device) "
        "or fp8 (CUDA, compute capability 8.9+); with the eager or compile UNet backends.",
    )
    cache_interval: int = Field(
        3,
        ge=2,
        description="speed: cached requests run the whole UNet every this many steps and only "
        "its shallow branch in between (step caching); on SD3/FLUX every block runs on the "
        "first two steps and then every this many steps, the output extrapolated in between.",
    )
    noise_on_device: bool = Field(
        False,
        description="Hot path: each request's noise from a generator on the engine's device (no "
        "host work per ancestral step). Still per request (batch-independent), but a seed gives "
        "another image than with the default CPU generators; recorded in the metadata.",
    )
    prompt_cache_size: int = Field(
        1024, ge=0, description="Prompt embeddings kept (LRU); 0 disables the cache."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads on CPU (set by the engine); default: all cores."
    )
    lora_cache_size: int = Field(
        8, ge=1,
        description="LoRA adapters (a request's lora at its lora_scale) kept loaded in the UNet "
        "(LRU; the least recently used is deleted from the UNet to make room). An engine batch "
        "names at most this many; a batch naming more is split.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check_quantize(self) -> EngineConfig:
        allowed = (*QUANTIZABLE_UNET_BACKENDS, UNetBackend.auto.value)
        if self.quantize is not Quantization.none and self.unet_backend.value not in allowed:
            raise ValueError(f"quantize: {self.quantize.value} runs with the "
                             f"{', '.join(QUANTIZABLE_UNET_BACKENDS)} or auto UNet backends, "
                             f"not {self.unet_backend.value}")  # fmt: skip
        return self


HOT_PATH_OPTIONS = ("fuse_qkv", "channels_last", "noise_on_device")  # EngineConfig switches


class CostConfig(BaseModel):
    """Prices that turn engine time into money in the run summary and `daguerre inspect`."""

    model_config = ConfigDict(extra="forbid")

    gpu_hour_usd: float | None = Field(
        None, ge=0,
        description="Price of one GPU-hour (an engine actor's or replica's hour on a CPU "
        "machine); with it the summary gives the cost per 1,000 images.",
    )  # fmt: skip
    currency: str = Field("USD", description="What the price is in (a label only).")


class JobConfig(BaseModel):
    """A batch job: where rows come from, where outputs go, how the actor pool is sized."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    marks: MarksConfig = Field(default_factory=MarksConfig)
    composite: CompositeConfig = Field(default_factory=CompositeConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    encoding: EncodingConfig = Field(default_factory=EncodingConfig)
    credentials: CredentialsConfig = Field(default_factory=CredentialsConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    rules: PromptRules = Field(default_factory=PromptRules)
    batch_size: int = Field(4, ge=1, description="Rows per engine call (Ray Data batch).")
    min_actors: int = Field(1, ge=1, description="Engine actors kept alive.")
    max_actors: int = Field(1, ge=1, description="Engine actors Ray Data may scale up to.")
    actor_num_cpus: float = Field(
        1.0,
        gt=0,
        description="CPUs reserved per engine actor when there is no GPU (keep some free for reads).",
    )
    actor_num_gpus: float = Field(
        1.0, ge=0, description="GPUs per engine actor when CUDA is present."
    )
    writer_num_cpus: float = Field(
        0.25, gt=0, description="CPUs reserved per PNG-encode/write task."
    )
    wait_for_min_actors_s: float = Field(
        600, gt=0, description="How long to wait for the first actors (model load)."
    )
    engine_pool: Literal["actors", "serve"] = Field(
        "actors",
        description="actors: a dedicated engine actor pool for this job; serve: the engine "
        "replicas of a running `daguerre serve` app on the same cluster (--via-serve), "
        "behind their online traffic.",
    )
    serve_app: str = Field("daguerre", description="engine_pool serve: the Serve application.")
    serve_calls_per_replica: int = Field(
        2, ge=1,
        description="engine_pool serve: the job's engine calls in flight per replica (one "
        "running and one waiting keeps a replica busy; more only queue).",
    )  # fmt: skip
    plan_in_driver_rows: int = Field(
        200_000, ge=0,
        description="Manifests up to this many rows are planned (duplicates, finished ids) in "
        "the driver; bigger ones through Ray Data across the cluster, so the driver's memory "
        "does not grow with the manifest.",
    )  # fmt: skip
    compact_target_mb: float = Field(
        128, gt=0,
        description="Metadata and errors fragments are merged into Parquet files of about "
        "this size at the end of a job (and by `daguerre compact`).",
    )  # fmt: skip
    cost: CostConfig = Field(default_factory=lambda: CostConfig())
    output_format: Literal["images", "webdataset"] = Field(
        "images",
        description="images: one PNG object per image; webdataset: tar shards of shard_images "
        "images (a PNG and a JSON each) that training pipelines read directly.",
    )
    shard_images: int = Field(
        256, ge=1, description="output_format webdataset: images per shard (one write batch; "
        "its raw pixels are held in memory while the shard is built).",
    )  # fmt: skip
    key_prefix: Literal["flat", "hashed"] = Field(
        "flat",
        description="hashed: images/<hh>/<id>.png (256 prefixes), so an object store does not "
        "throttle one hot prefix; flat: images/<id>.png.",
    )

    @model_validator(mode="after")
    def _check_actors(self) -> JobConfig:
        if self.max_actors < self.min_actors:
            raise ValueError(
                f"max_actors: {self.max_actors} is below min_actors ({self.min_actors})"
            )
        return self


class ModelDeploymentConfig(BaseModel):
    """One model served online: its engine and how its replicas batch, scale and shed load."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None,
        description="Name clients ask for (`model` in requests); default: the preset or folder name.",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        description="How long a replica waits for more requests before running a batch. 0 runs at "
        "once; requests arriving while the engine is busy join the next batch anyway.",
    )
    online_fill_slack: float | None = Field(
        0.25,
        ge=0,
        description="Batch-job work joins an online request's engine batch only while the "
        "batch's expected time stays within this fraction over the online work's alone (costs "
        "learned per bucket and batch size; on a GPU a fuller batch costs little, on a CPU each "
        "image adds its time). null: always fill.",
    )
    min_replicas: int = Field(1, ge=0, description="Replicas kept alive (0 allows scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Replicas Serve may scale up to.")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="Autoscaling target per replica; default: engine.max_batch_size."
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Requests one replica holds at once; default: 1.5 x target_ongoing_requests "
        "(close to the target, so replicas added under load get their share at once).",
    )
    upscale_delay_s: float = Field(
        5.0, ge=0, description="How long load must stay above target before adding a replica."
    )
    downscale_delay_s: float = Field(
        60.0, ge=0, description="How long load must stay below target before removing one."
    )
    look_back_period_s: float = Field(
        15.0, gt=0,
        description="Window over which the autoscaler averages the load (longer than the 10 s "
        "Serve takes between load reports).",
    )  # fmt: skip
    max_queued_requests: int = Field(
        64,
        ge=-1,
        description="Requests waiting for a replica before new ones get 503 (-1: no limit).",
    )
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After sent with a 503.")
    num_gpus: float | Literal["auto"] = Field(
        "auto", description="GPUs per replica; 'auto' is 1 when the cluster has GPUs, else 0."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")

    @property
    def served_name(self) -> str:
        """The name clients use for this model."""
        return self.name or Path(self.engine.model.rstrip("/")).name

    @model_validator(mode="after")
    def _check_replicas(self) -> ModelDeploymentConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas: {self.max_replicas} is below min_replicas ({self.min_replicas})"
            )
        return self


class ServeConfig(BaseModel):
    """The online service: models, limits, auth and HTTP settings (configs/serve/*.yaml)."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    models: list[ModelDeploymentConfig] = Field(
        default_factory=lambda: [ModelDeploymentConfig()],
        min_length=1,
        description="Models served; the first is the default when a request names none.",
    )
    limits: RequestLimits = Field(default_factory=RequestLimits)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    marks: MarksConfig = Field(default_factory=MarksConfig)
    composite: CompositeConfig = Field(default_factory=CompositeConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    encoding: EncodingConfig = Field(default_factory=EncodingConfig)
    credentials: CredentialsConfig = Field(default_factory=CredentialsConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    rules: PromptRules = Field(default_factory=PromptRules)
    max_images_per_request: int = Field(
        10, ge=1, le=100, description="Most images one native request may ask for (OpenAI n <= 10)."
    )
    max_request_pixel_steps: int | None = Field(
        1024 * 1024 * 50 * 4,
        ge=1,
        description="Compute budget of one HTTP request: width x height x steps summed over its "
        "images (default: four 1024x1024 images at 50 steps); beyond it, 400. null: none.",
    )
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024,
        description="Largest HTTP request body, checked before parsing (413); uploads for "
        "image edits count.",
    )  # fmt: skip
    output: str = Field(
        "output/serve",
        description="Prefix (folder or s3://) where response_format=url images and metadata go.",
    )
    auth_token_env: str = Field(
        "DAGUERRE_API_TOKEN",
        description="Environment variable holding the bearer token; auth is off when it is unset.",
    )
    auth_token_file: str | None = Field(
        None, description="File holding the bearer token (takes precedence over the variable)."
    )
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the HTTP ingress (CPU).")
    ingress_num_cpus: float = Field(0.1, ge=0, description="CPUs reserved per ingress replica.")
    ingress_max_ongoing_requests: int = Field(
        256, ge=1, description="HTTP requests one ingress replica holds at once."
    )
    request_timeout_s: float | None = Field(
        300, gt=0, description="End-to-end HTTP timeout in seconds (408 after it); null: none."
    )
    url_ttl_s: float = Field(
        3600, gt=0, description="How long a response_format=url link stays valid (signed)."
    )
    url_secret_env: str = Field(
        "DAGUERRE_URL_SECRET",
        description="Environment variable holding the secret that signs image URLs; unset: a "
        "random secret per deployment (links then end with it).",
    )
    lora_roots: list[str] = Field(
        default_factory=list,
        description="Folders or s3:// prefixes under which online requests may name a `lora` "
        "adapter (anything else is 400); empty: online requests may not name one. Batch "
        "manifests may name any path the job can read.",
    )

    @model_validator(mode="after")
    def _check_names(self) -> ServeConfig:
        names = [m.served_name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"models: the name {duplicates[0]!r} is used twice; give each model a distinct name"
            )
        return self


def load_yaml(path: str | Path, model: type[M], overrides: dict[str, Any] | None = None) -> M:
    """`model` validated from a YAML file, with `overrides` applied on top."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    return validate_config(model, _merge(data, overrides or {}), source=str(path))


def validate_config(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    """`model` validated from a dict; errors name the source, the key and the reason."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            fe = field_error(err)
            if err["type"] == "extra_forbidden":
                fe.reason = "is not a known key" + _known_keys(model, err["loc"])
            lines.append(f"{source}: {fe.field}: {fe.reason}")
        raise ConfigError("\n".join(lines)) from None


def _known_keys(model: type[BaseModel], loc: tuple) -> str:
    target: Any = model
    for part in loc[:-1]:
        field = target.model_fields.get(part) if isinstance(target, type) else None
        target = field.annotation if field else None
    if isinstance(target, type) and issubclass(target, BaseModel):
        return f" (known: {', '.join(target.model_fields)})"
    return ""


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
