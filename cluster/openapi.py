"""The API's OpenAPI document, true to the deployment that serves it.

FastAPI derives the document from the routes and the HTTP models; this module corrects
what it cannot know:
- errors: the server answers 400 (not FastAPI's validation 422) in one shape,
  `ErrorResponse`; each route lists the statuses it really returns (declared on the
  routes, ingress.py; 422 there is the quality gate's);
- limits: every rule of the deployment's `RequestLimits` that JSON Schema can state (prompt
  lengths, step and guidance ranges, sizes as multiples of `size_multiple`, id syntax,
  images per call, `lora`'s length and `lora_scale`'s range), so generated clients and
  fuzzers see what the validators enforce; where `lora` may point (`lora_roots`) is said in
  its description;
- auth: the bearer scheme on the routes that need it, when a token is configured.

What JSON Schema cannot state (the per-request compute budget, pixels per image when
`max_pixels` < `max_side`**2, one model per native call) is said in the operations'
descriptions; those requests get a 400 naming the rule.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from ..pipeline.config import ServeConfig
from ..pipeline.schema import (
    ID_PATTERN,
    LORA_SCALE_LIMIT,
    MAX_ID_CHARS,
    MAX_LORA_CHARS,
    SEED_LIMIT,
    TEXT_PATTERN,
    RequestLimits,
)
from ..pipeline.storage import is_remote
from .http_app import needs_token

BEARER = "bearer"
MAX_SIZE_PATTERN_CHARS = 64 * 1024  # above it, the plain WIDTHxHEIGHT syntax is documented
BUDGETED = ("/v1/images/generations", "/v1/images/edits", "/v1/generate")


def api_document(base: dict[str, Any], config: ServeConfig, *, auth: bool) -> dict[str, Any]:
    """The served document: FastAPI's `base` corrected for `config` (see the module doc)."""
    doc = copy.deepcopy(base)
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, item in doc["paths"].items():
        for operation in item.values():
            responses = operation.get("responses", {})
            if "HTTPValidationError" in json.dumps(responses.get("422", {})):  # FastAPI's
                responses.pop("422")
            if auth and needs_token(path):
                operation["security"] = [{BEARER: []}]
    if auth:
        doc["components"]["securitySchemes"] = {BEARER: {"type": "http", "scheme": "bearer"}}
        files = doc["paths"]["/v1/files/{key}"]["get"]
        files["security"] = [{BEARER: []}, {}]  # or a signed link (expires + signature)
    _state_limits(schemas, config)
    budget = config.max_request_pixel_steps
    for path in BUDGETED:
        operation = doc["paths"][path]["post"]
        operation["description"] += (f" This server's budget: {budget:,} pixel-steps." if budget
                                      else " This server sets no budget.")  # fmt: skip
    return doc


def _state_limits(schemas: dict[str, Any], config: ServeConfig) -> None:
    limits = config.limits
    text = {"type": "string", "maxLength": limits.max_prompt_chars}
    prompt = {**text, "minLength": 1, "pattern": TEXT_PATTERN}
    steps = {"type": "integer", "minimum": 1, "maximum": limits.max_steps}
    guidance = {"type": "number", "minimum": 0, "maximum": limits.max_guidance_scale}
    seed = {"type": "integer", "minimum": 0, "maximum": SEED_LIMIT - 1}
    side = {"type": "integer", "minimum": limits.size_multiple, "maximum": limits.max_side,
            "multipleOf": limits.size_multiple}  # fmt: skip
    images = schemas["ImagesGenerationRequest"]["properties"]
    images["prompt"].update(prompt)
    images["negative_prompt"].update(text)
    _nullable(images["steps"], steps)
    _nullable(images["guidance_scale"], guidance)
    _nullable(images["seed"], seed)
    _nullable(images["size"], {"type": "string", "pattern": size_pattern(limits)})
    images["size"]["description"] += (
        f" Sides: multiples of {limits.size_multiple} up to {limits.max_side}; at most "
        f"{limits.max_pixels:,} pixels."
    )
    item = schemas["ImageRequestIn"]["properties"]
    item["prompt"].update(prompt)
    id_rule = {"type": "string", "maxLength": MAX_ID_CHARS, "pattern": ID_PATTERN}
    _nullable(item["id"], id_rule)
    _nullable(item["negative_prompt"], text)
    _nullable(item["steps"], steps)
    _nullable(item["guidance_scale"], guidance)
    _nullable(item["seed"], seed)
    _nullable(item["width"], side)
    _nullable(item["height"], side)
    schemas["GenerateRequest"]["properties"]["requests"]["maxItems"] = config.max_images_per_request
    _state_lora(images, config)
    _state_lora(item, config)


# `lora`: no control characters (ECMA-262 pattern), as ImageRequest checks.
LORA_CHARS = "[^\\u0000-\\u001f\\u007f]"


def _state_lora(properties: dict[str, Any], config: ServeConfig) -> None:
    """`lora` and `lora_scale` as the validators and this server's lora_roots take them: with
    no roots only null (online LoRA off); else paths that start with a root (whether the
    adapter exists and fits the model is known only when it is read: else 400 naming lora)."""
    _nullable(properties["lora_scale"],
              {"type": "number", "minimum": -LORA_SCALE_LIMIT, "maximum": LORA_SCALE_LIMIT})  # fmt: skip
    roots = config.lora_roots
    if not roots:
        properties["lora"]["anyOf"] = [{"type": "null"}]
        properties["lora"]["description"] += " This server has online LoRA off: only null."
        return
    shown = [r if is_remote(r) else os.path.realpath(r.removeprefix("file://")) for r in roots]
    prefixes = "|".join(_ecma_escape(r.rstrip("/") + "/") for r in shown)
    _nullable(properties["lora"], {"type": "string", "minLength": 1, "maxLength": MAX_LORA_CHARS,
                                   "pattern": f"^({prefixes}){LORA_CHARS}*$"})  # fmt: skip
    properties["lora"]["description"] += (
        f" This server reads adapters under: {', '.join(shown)}; a path outside them (after "
        "resolving links and ..), missing, or not a LoRA of this model is 400."
    )


def _ecma_escape(text: str) -> str:
    """`text` as a literal in an ECMA-262 pattern (unicode mode rejects Python's escapes of -)."""
    return "".join("\\" + c if c in "\\^$.*+?()[]{}|/" else c for c in text)


def _nullable(prop: dict[str, Any], rule: dict[str, Any]) -> None:
    """Replace the non-null branch of an `anyOf: [X, null]` property by `rule`."""
    prop["anyOf"] = [rule, {"type": "null"}]


def size_pattern(limits: RequestLimits) -> str:
    """A pattern matching exactly the `size` strings `limits` accept: "auto", or
    "WIDTHxHEIGHT" with both sides multiples of `size_multiple` up to `max_side` and at most
    `max_pixels` pixels (widths sharing their tallest height share one alternative). Where
    that would be over MAX_SIZE_PATTERN_CHARS (fine steps, large sides), only the syntax:
    the sides' rules are then in the description and the 400 names them."""
    step = limits.size_multiple
    sides = range(step, limits.max_side + 1, step)
    tallest: dict[int, list[int]] = {}  # tallest height allowed -> widths allowing it
    for width in sides:
        height = min(limits.max_side, limits.max_pixels // width // step * step)
        if height >= step:
            tallest.setdefault(height, []).append(width)
    branches = [
        f"({'|'.join(map(str, widths))})x({'|'.join(str(h) for h in sides if h <= height)})"
        for height, widths in tallest.items()
    ]
    if not branches:
        return "^auto$"
    pattern = f"^(auto|{'|'.join(branches)})$"
    return pattern if len(pattern) <= MAX_SIZE_PATTERN_CHARS else SYNTAX_ONLY


SYNTAX_ONLY = "^(auto|[1-9][0-9]{0,5}x[1-9][0-9]{0,5})$"
