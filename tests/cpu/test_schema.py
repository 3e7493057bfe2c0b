"""The request contract: every bad input names its field and reason; Arrow schemas derive from it."""

from __future__ import annotations

import pyarrow as pa
import pytest
from daguerre.pipeline.schema import (
    ImageRecord,
    ImageRequest,
    RequestLimits,
    manifest_schema,
    record_schema,
    seed_from_id,
    validate_request,
)


def errors_of(row, limits=None):
    result = validate_request(row, limits or RequestLimits())
    assert isinstance(result, list), f"expected errors, got {result!r}"
    return {e.field: e.reason for e in result}


def test_minimal_row_takes_defaults():
    request = validate_request({"id": "a", "prompt": "a cat"})
    assert isinstance(request, ImageRequest)
    assert (request.steps, request.guidance_scale, request.scheduler.value) == (30, 7.5, "ddim")
    assert request.width is None and request.seed is None
    assert request.resolved_seed == seed_from_id("a") == seed_from_id("a")


def test_each_family_has_its_default_scheduler_and_guidance():
    from daguerre.pipeline.schema import RequestLimits

    defaults = {}
    for family in ("unet", "sd3", "flux"):
        request = validate_request({"id": "a", "prompt": "a cat"},
                                   RequestLimits().for_family(family))  # fmt: skip
        defaults[family] = (request.scheduler.value, request.guidance_scale)
    assert defaults == {"unet": ("ddim", 7.5), "sd3": ("euler", 7.0), "flux": ("euler", 3.5)}
    capped = RequestLimits(max_guidance_scale=2.0).for_family("flux")
    assert validate_request({"id": "a", "prompt": "x"}, capped).guidance_scale == 2.0
    chosen = RequestLimits(default_guidance_scale=5.0).for_family("flux")
    assert validate_request({"id": "a", "prompt": "x"}, chosen).guidance_scale == 5.0


def test_nulls_count_as_missing():
    request = validate_request(
        {"id": "a", "prompt": "x", "steps": None, "seed": None, "metadata": None}
    )
    assert isinstance(request, ImageRequest) and request.steps == 30


@pytest.mark.parametrize(
    ("row", "field", "words"),
    [
        ({"id": "a"}, "prompt", "required"),
        ({"id": "a", "prompt": ""}, "prompt", "must not be empty"),
        ({"id": "a", "prompt": "  \t"}, "prompt", "must not be empty"),
        ({"id": "a", "prompt": "x" * 2001}, "prompt", "at most 2000"),
        ({"id": "a", "prompt": "x", "steps": 0}, "steps", "1 <= steps <= 150"),
        ({"id": "a", "prompt": "x", "steps": -3}, "steps", "out of range"),
        ({"id": "a", "prompt": "x", "steps": 151}, "steps", "out of range"),
        ({"id": "a", "prompt": "x", "width": 100}, "width", "not a multiple of 8"),
        ({"id": "a", "prompt": "x", "height": 4100}, "height", "out of range"),
        ({"id": "a", "prompt": "x", "width": 2048, "height": 2048, "steps": 1}, None, None),
        ({"id": "a", "prompt": "x", "seed": -1}, "seed", "0 <= seed"),
        (
            {"id": "a", "prompt": "x", "scheduler": "plms"},
            "scheduler",
            "use one of 'ddim', 'euler', 'euler_a', 'dpmpp_2m'",
        ),
        (
            {"id": "a", "prompt": "x", "guidance_scale": float("nan")},
            "guidance_scale",
            "out of range",
        ),
        ({"id": "", "prompt": "x"}, "id", "must not be empty"),
        ({"id": "../x", "prompt": "x"}, "id", "escape"),
        ({"id": "a/../../x", "prompt": "x"}, "id", "escape"),
        ({"id": "/abs", "prompt": "x"}, "id", "absolute"),
        ({"id": "a\\b", "prompt": "x"}, "id", "backslash"),
        ({"id": "a\nb", "prompt": "x"}, "id", "control characters"),
        ({"id": "a\x00", "prompt": "x"}, "id", "control characters"),
        ({"id": "a b", "prompt": "x"}, "id", "may only use"),
        ({"id": "a", "prompt": "x", "colour": "red"}, "colour", "not a known field"),
    ],
)
def test_bad_rows_name_field_and_reason(row, field, words):
    if field is None:
        assert isinstance(validate_request(row), ImageRequest)
        return
    errors = errors_of(row)
    assert field in errors, errors
    assert words in errors[field], errors[field]


def test_pixel_limit_names_both_fields():
    errors = errors_of(
        {"id": "a", "prompt": "x", "width": 1024, "height": 1024},
        RequestLimits(max_pixels=512 * 512),
    )
    assert "width,height" in errors and "at most 262144" in errors["width,height"]


def test_limits_come_from_config():
    row = {"id": "a", "prompt": "x", "steps": 60}
    assert isinstance(validate_request(row), ImageRequest)
    assert "1 <= steps <= 50" in errors_of(row, RequestLimits(max_steps=50))["steps"]


def test_nested_ids_are_allowed():
    assert isinstance(validate_request({"id": "shoes/red/0001", "prompt": "x"}), ImageRequest)


def test_manifest_schema_requires_only_id_and_prompt():
    schema = manifest_schema()
    required = {f.name for f in schema if not f.nullable}
    assert required == {"id", "prompt"}
    assert set(schema.names) == set(ImageRequest.model_fields)
    assert schema.field("metadata").type == pa.map_(pa.string(), pa.string())


def test_record_schema_has_provenance():
    schema = record_schema()
    for name in (
        "uri",
        "sha256",
        "weights_hash",
        "scheduler_config",
        "backend",
        "timings",
        "created_at",
        "node_id",
    ):
        assert name in schema.names
    assert set(ImageRequest.model_fields) <= set(schema.names)
    assert set(schema.names) == set(ImageRecord.model_fields)
