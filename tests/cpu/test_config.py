"""Configs: YAML validated by pydantic; unknown keys rejected with the key named."""

from __future__ import annotations

import importlib.resources

import pytest
from daguerre.pipeline.config import ConfigError, JobConfig, load_yaml
from daguerre.pipeline.models import get_preset, preset_names


def test_shipped_job_configs_validate():
    folder = importlib.resources.files("daguerre.configs") / "jobs"
    names = [p.name for p in folder.iterdir() if p.name.endswith(".yaml")]
    assert names
    for name in names:
        load_yaml(str(folder / name), JobConfig)


def test_shipped_presets_validate():
    assert {"tiny", "tiny-xl", "small", "sd15", "sdxl"} <= set(preset_names())
    for name in preset_names():
        assert get_preset(name).name == name


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("batch_sizee: 4\nengine:\n  modle: tiny\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path, JobConfig)
    text = str(err.value)
    assert "batch_sizee: is not a known key" in text and "batch_size" in text
    assert "engine.modle: is not a known key" in text and str(path) in text


def test_bad_value_is_named(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("min_actors: 3\nmax_actors: 2\n")
    with pytest.raises(ConfigError, match="max_actors: 2 is below min_actors"):
        load_yaml(path, JobConfig)


def test_flags_override_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("batch_size: 2\nengine:\n  model: tiny\n")
    config = load_yaml(path, JobConfig, {"batch_size": 8})
    assert config.batch_size == 8 and config.engine.model == "tiny"


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="neither a preset"):
        get_preset("sd99")
