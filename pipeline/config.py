"""Configuration of the engine and of batch jobs: pydantic models loaded from YAML.

Unknown keys are rejected with the key named, so a typo never silently falls back to
a default. Light to import (no torch, ray or diffusers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from daguerre.pipeline.schema import RequestLimits, field_error
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message says where and why."""


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
    attention_backend: Literal["sdpa"] = Field(
        "sdpa", description="Attention implementation inside the UNet (more arrive with kernels/)."
    )
    unet_backend: Literal["eager"] = Field(
        "eager", description="How the UNet runs (compiled backends arrive with kernels/)."
    )
    max_batch_size: int = Field(
        8, ge=1, description="Most images denoised together in one UNet call (before CFG doubling)."
    )
    prompt_cache_size: int = Field(
        1024, ge=0, description="Prompt embeddings kept (LRU); 0 disables the cache."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads on CPU (set by the engine); default: all cores."
    )


class JobConfig(BaseModel):
    """A batch job: where rows come from, where outputs go, how the actor pool is sized."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig)
    limits: RequestLimits = Field(default_factory=RequestLimits)
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

    @model_validator(mode="after")
    def _check_actors(self) -> JobConfig:
        if self.max_actors < self.min_actors:
            raise ValueError(
                f"max_actors: {self.max_actors} is below min_actors ({self.min_actors})"
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
