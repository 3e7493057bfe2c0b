"""`daguerre manifest`: prompts x seeds -> a valid manifest."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from daguerre.cluster.cli import main
from daguerre.pipeline.manifest import ManifestBuildError, build_manifest, demo_manifest
from daguerre.pipeline.schema import ImageRequest, validate_request

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_txt_times_seeds(tmp_path):
    out = tmp_path / "m.parquet"
    assert (
        main(
            [
                "manifest",
                str(EXAMPLES / "prompts.txt"),
                "-o",
                str(out),
                "--seeds",
                "2",
                "--steps",
                "5",
            ]
        )
        == 0
    )
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 3 * 2
    assert rows[0]["id"] == "prompts-00001-s000" and rows[1]["id"] == "prompts-00001-s001"
    assert {r["steps"] for r in rows} == {5}
    assert all(isinstance(validate_request(r), ImageRequest) for r in rows)


def test_seed_suffixes_sort_in_seed_order():
    ids = build_manifest(EXAMPLES / "prompts.txt", seeds=12).column("id").to_pylist()
    first_prompt = [i for i in ids if i.startswith("prompts-00001-")]
    assert first_prompt == sorted(first_prompt)  # -s007 before -s010, not -s10 before -s7
    assert first_prompt[7] == "prompts-00001-s007" and first_prompt[10] == "prompts-00001-s010"
    wide = build_manifest(EXAMPLES / "prompts.txt", seeds=2, seed_base=9999).column("id")
    assert wide.to_pylist()[:2] == ["prompts-00001-s09999", "prompts-00001-s10000"]  # one width


def test_csv_template_fills_prompt_and_metadata(tmp_path):
    table = build_manifest(
        EXAMPLES / "products.csv",
        template="a studio photo of {product}, {style}",
        seeds=1,
        seed_base=7,
    )
    rows = table.to_pylist()
    assert rows[0]["prompt"] == "a studio photo of a red ceramic teapot, soft window light"
    assert rows[0]["seed"] == 7
    assert dict(rows[0]["metadata"]) == {
        "product": "a red ceramic teapot",
        "style": "soft window light",
    }


def test_template_field_missing_is_named(tmp_path):
    with pytest.raises(ManifestBuildError, match="template field 'colour' is not a column"):
        build_manifest(EXAMPLES / "products.csv", template="{product} in {colour}")


def test_invalid_defaults_are_refused(tmp_path, capsys):
    code = main(
        [
            "manifest",
            str(EXAMPLES / "prompts.txt"),
            "-o",
            str(tmp_path / "m.parquet"),
            "--width",
            "100",
        ]
    )
    assert code == 2
    assert "width: 100 is not a multiple of 8" in capsys.readouterr().err


def test_demo_manifest_has_two_bad_rows():
    rows = demo_manifest().to_pylist()
    bad = [r["id"] for r in rows if not isinstance(validate_request(r), ImageRequest)]
    assert bad == ["demo-bad-size", "demo-bad-prompt"] and len(rows) == 10
