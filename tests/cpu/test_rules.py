"""Prompt rules (rules:): a row breaking one goes to the errors table (stage rules, the rule
in the reason) and the job goes on (online, a 400 naming the prompt: test_catalog.py); passing
prompts get the brand style, recorded as made, and a rerun sees no change."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from daguerre.pipeline.config import (
    ConfigError,
    EngineConfig,
    JobConfig,
    ServeConfig,
    validate_config,
)
from daguerre.pipeline.rules import PromptRules, RuleBroken, apply_rules, broken_rule
from daguerre.pipeline.schema import ImageRequest, manifest_schema

pytestmark = pytest.mark.timeout(300)
BRAND = PromptRules(forbidden_terms=("gun", "competitor brand"), required_terms=("product",),
                    forbidden_patterns=(r"\b\d{4}-\d{4}\b",), style_suffix="studio light",
                    negative_suffix="blurry")  # fmt: skip


def test_terms_match_whole_words_case_insensitively():
    assert broken_rule("a product, begun at dawn", BRAND) is None
    assert (
        broken_rule("a PRODUCT with a Gun", BRAND)
        == "breaks rules.forbidden_terms: 'gun' is not allowed"
    )
    assert (
        broken_rule("a product by Competitor  Brand", BRAND) is None
    )  # two spaces: not the phrase
    assert broken_rule("a product by competitor brand", BRAND).startswith(
        "breaks rules.forbidden_terms"
    )
    assert broken_rule("a vase", BRAND) == "breaks rules.required_terms: must contain 'product'"
    assert "forbidden_patterns" in broken_rule("product, call 5555-1234", BRAND)


def test_a_passing_prompt_gets_the_style_and_a_failing_one_names_the_field():
    styled = apply_rules(ImageRequest(id="a", prompt="a product shot"), BRAND)
    assert styled.prompt == "a product shot, studio light" and styled.negative_prompt == "blurry"
    refused = apply_rules(ImageRequest(id="b", prompt="a vase"), BRAND, "requests.3.prompt")
    assert isinstance(refused, RuleBroken) and refused.field == "requests.3.prompt"


def test_a_job_records_broken_rules_and_makes_the_rest(ray_session, tmp_path):
    from daguerre.cluster.job import run_job

    rows = [{"id": "ok", "prompt": "a product on a table", "seed": 1, "steps": 2},
            {"id": "bad", "prompt": "a product with a gun", "seed": 2, "steps": 2},
            {"id": "none", "prompt": "a vase", "seed": 3, "steps": 2},
            {"id": "long", "prompt": "a product " + "x" * 1990, "seed": 4, "steps": 2}]  # fmt: skip
    schema = pa.schema([f.with_nullable(True) for f in manifest_schema()])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "m.parquet")
    config = JobConfig(engine=EngineConfig(model="tiny", device="cpu"), rules=BRAND)
    out = tmp_path / "out"
    summary = run_job(str(tmp_path / "m.parquet"), str(out), config, progress=False)
    assert summary.generated == 2 and summary.errors_by_stage == {"rules": 2}
    records = {r["id"]: r for r in pads.dataset(out / "metadata").to_table().to_pylist()}
    assert len(records["long"]["prompt"]) > 2000  # the style may pass the limit it came in under
    record = records["ok"]
    assert record["prompt"] == "a product on a table, studio light"
    assert record["negative_prompt"] == "blurry"
    errors = {e["id"]: e for e in pads.dataset(out / "errors").to_table().to_pylist()}
    assert errors["bad"]["stage"] == "rules" and errors["bad"]["field"] == "prompt"
    assert errors["bad"]["reason"] == "breaks rules.forbidden_terms: 'gun' is not allowed"
    assert errors["none"]["reason"] == "breaks rules.required_terms: must contain 'product'"
    again = run_job(str(tmp_path / "m.parquet"), str(out), config, progress=False)
    assert again.generated == 0 and again.skipped_done == 2  # the styled prompt is no change
    assert again.errors_by_stage == {"rules": 2}


def test_a_bad_pattern_is_one_line_naming_the_field():
    with pytest.raises(
        ConfigError, match=r"rules\.forbidden_patterns: .*item 0: '\(' is not a regular"
    ):
        validate_config(JobConfig, {"rules": {"forbidden_patterns": ["("]}})
    with pytest.raises(ConfigError, match=r"rules\.style: is not a known key"):
        validate_config(ServeConfig, {"rules": {"style": "x"}})
