"""Property-based tests (hypothesis): validation and the manifest path on generated input.

Any row becomes a valid request or errors naming its fields, never an exception; a valid
id never makes a key outside `images/`; the OpenAPI document's patterns (read as JSON
Schema reads them) accept exactly what the validators accept; a manifest of arbitrary
rows yields exactly one image or one error row per input row.
"""

from __future__ import annotations

import math
import posixpath
import re

import jsonschema_rs
import pyarrow as pa
import pytest
from daguerre.cluster.api import GenerateRequest, ImagesGenerationRequest
from daguerre.cluster.openapi import size_pattern
from daguerre.pipeline.id_index import IdIndex, id_digests, repeated
from daguerre.pipeline.schema import (
    ID_PATTERN,
    MAX_ID_CHARS,
    SCHEDULERS,
    TEXT_PATTERN,
    FieldError,
    ImageRequest,
    RequestLimits,
    manifest_schema,
    validate_request,
)
from daguerre.pipeline.storage import image_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

COLUMNS = set(ImageRequest.model_fields)
anything = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
ids = st.one_of(
    st.text(max_size=20),
    st.from_regex(ID_PATTERN, fullmatch=True),
    st.lists(st.sampled_from(["a", "..", ".", "", "b-1", "/", "\\", "c\x00"]), max_size=5).map("/".join),
)  # fmt: skip
rows = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(ids, anything),
        "prompt": st.one_of(st.text(max_size=30), anything),
        "negative_prompt": st.one_of(st.text(max_size=10), anything),
        "seed": st.one_of(st.integers(-(2**64), 2**64), anything),
        "steps": st.one_of(st.integers(-3, 200), anything),
        "guidance_scale": st.one_of(st.floats(allow_nan=True), anything),
        "width": st.one_of(st.integers(-8, 3000), anything),
        "height": st.one_of(st.integers(-8, 3000), anything),
        "scheduler": st.one_of(st.sampled_from(SCHEDULERS), anything),
        "speed": st.one_of(st.sampled_from(["exact", "cached"]), anything),
        "metadata": st.one_of(st.dictionaries(st.text(max_size=4), st.text(max_size=4)), anything),
        "unknown": anything,
    },
)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(rows)
def test_any_row_is_a_request_or_errors_naming_its_fields(row):
    result = validate_request(row)
    if isinstance(result, ImageRequest):
        return
    assert result and all(isinstance(e, FieldError) and e.reason for e in result)
    for error in result:
        named = set(re.split(r"[.,]", error.field))
        assert named & (COLUMNS | set(row)), error


@FAST
@given(ids)
def test_a_valid_id_never_makes_a_key_outside_images(request_id):
    result = validate_request({"id": request_id, "prompt": "x"})
    if isinstance(result, list):
        assert any(e.field == "id" for e in result)
        return
    key = image_key(result.id)
    assert key.startswith("images/") and posixpath.normpath(key) == key
    assert ".." not in key.split("/") and "\\" not in key and "\x00" not in key


@FAST
@given(st.text(max_size=8))
def test_the_documents_text_pattern_agrees_with_the_prompt_check(text):
    documented = jsonschema_rs.validator_for({"type": "string", "pattern": TEXT_PATTERN})
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return  # not JSON-encodable text: refused on its own (lone surrogate)
    accepted = not isinstance(validate_request({"id": "a", "prompt": text}), list)
    assert documented.is_valid(text) == accepted


@FAST
@given(ids)
def test_the_documents_id_pattern_agrees_with_the_id_check(request_id):
    rule = {"type": "string", "pattern": ID_PATTERN, "maxLength": MAX_ID_CHARS}
    accepted = not isinstance(validate_request({"id": request_id, "prompt": "x"}), list)
    assert jsonschema_rs.validator_for(rule).is_valid(request_id) == accepted


limits = st.builds(
    RequestLimits,
    max_side=st.sampled_from([16, 32, 64, 96]),
    size_multiple=st.sampled_from([4, 8, 16]),
    max_pixels=st.integers(64, 96 * 96),
)


sizes = st.one_of(
    st.tuples(st.integers(0, 130), st.integers(0, 130)).map(lambda wh: f"{wh[0]}x{wh[1]}"),
    st.sampled_from(["", "auto", "064x64", "16x16\n", "16X16", " 16x16", "16 x 16", "x16"]),
)


@FAST
@given(limits, sizes)
def test_the_documents_size_pattern_agrees_with_the_size_check(limits, size):
    documented = jsonschema_rs.validator_for({"type": "string", "pattern": size_pattern(limits)})
    try:
        body = ImagesGenerationRequest(prompt="x", size=size)
        accepted = not isinstance(body.image_requests("online/t/r", 1, limits)[0], FieldError)
    except ValidationError:
        accepted = False
    assert documented.is_valid(size) == accepted, (size, limits)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
http_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"prompt": st.text(max_size=10)},
        optional={
            "n": json_values,
            "size": st.sampled_from(["16x16", "auto", "8x8"]) | json_values,
            "seed": st.integers(-5, 2**64) | json_values,
            "steps": json_values,
        },
    ),  # fmt: skip
)


@FAST
@given(http_bodies)
def test_any_json_body_is_a_request_or_a_validation_error(body):
    for model in (ImagesGenerationRequest, GenerateRequest):
        try:
            parsed = model.model_validate(body if model is ImagesGenerationRequest
                                          else {"requests": [body]})  # fmt: skip
        except ValidationError:
            continue
        if isinstance(parsed, ImagesGenerationRequest):
            out = parsed.image_requests("online/t/r", parsed.seed or 0, RequestLimits())
        else:
            out = parsed.image_requests("online/t/r", RequestLimits())
        assert isinstance(out, (list, tuple)) and out


# -- the manifest path: the job's validate stage on Arrow rows ---------------------------------

arrow_rows = st.fixed_dictionaries({
    "id": st.none() | ids.filter(lambda s: "\x00" not in s) | st.sampled_from(["dup", "dup"]),
    "prompt": st.none() | st.text(max_size=12),
    "seed": st.none() | st.integers(-(2**63), 2**63 - 1),
    "steps": st.none() | st.integers(-(2**63), 2**63 - 1),
    "guidance_scale": st.none() | st.floats(),
    "width": st.none() | st.integers(-(2**31), 2**31),
    "scheduler": st.none() | st.sampled_from([*SCHEDULERS, "plms", ""]),
    "metadata": st.none() | st.lists(st.tuples(st.text(max_size=3), st.text(max_size=3)), max_size=2),
})  # fmt: skip


@FAST
@given(st.lists(arrow_rows, min_size=1, max_size=12))
def test_the_validate_stage_yields_one_request_or_one_error_per_row(manifest_rows):
    from daguerre.cluster.stages import prepare_rows

    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    batch = pa.Table.from_pylist(manifest_rows, schema=schema)
    digests = id_digests(pa.array([r["id"] or "" for r in manifest_rows], pa.string()))
    prepared = prepare_rows(batch, IdIndex.empty(), repeated(digests), RequestLimits().model_dump(),
                            ["tiny"], 64).to_pylist()  # fmt: skip
    assert len(prepared) == len(manifest_rows)
    for out in prepared:
        assert (out["request"] is None) != (out["error_field"] is None), out
        if out["request"] is not None:
            request = ImageRequest.model_validate_json(out["request"])
            assert not math.isnan(request.guidance_scale)
    valid = [o["id"] for o in prepared if o["request"] is not None]
    assert len(set(valid)) == len(valid)


@pytest.mark.timeout(600)
@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(arrow_rows, min_size=4, max_size=16))
def test_a_job_over_arbitrary_rows_makes_one_image_or_one_error_per_row(ray_session, manifest_rows):
    """The whole job on generated rows: every input row is one image or one errors-table row."""
    import tempfile
    from pathlib import Path

    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    from daguerre.cluster.job import run_job
    from daguerre.pipeline.config import EngineConfig, JobConfig

    for i, row in enumerate(manifest_rows):  # small, fast images (no steps: max_steps, 2)
        row.update(steps=row["steps"] if row["steps"] is None or row["steps"] > 2 else 1,
                   width=64 if row["width"] is None or i % 2 else row["width"])  # fmt: skip
    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "m.parquet"
        pq.write_table(pa.Table.from_pylist(manifest_rows, schema=schema), manifest)
        config = JobConfig(batch_size=4, engine=EngineConfig(model="tiny", device="cpu"),
                           limits=RequestLimits(max_steps=2))  # fmt: skip
        summary = run_job(str(manifest), str(Path(tmp) / "out"), config, progress=False)
        tables = {name: pads.dataset(Path(tmp) / "out" / name, format="parquet").to_table()
                  for name in ("metadata", "errors") if (Path(tmp) / "out" / name).exists()}  # fmt: skip
    images = tables["metadata"].num_rows if "metadata" in tables else 0
    errors = tables["errors"].num_rows if "errors" in tables else 0
    assert images + errors == len(manifest_rows), summary
    assert summary.generated == images and summary.errors == errors
