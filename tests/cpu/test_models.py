"""Presets build offline with seeded weights; real diffusers folders load; the tokenizer is CLIP's."""

from __future__ import annotations

import numpy as np
import pytest
from daguerre.pipeline.config import ConfigError, EngineConfig
from daguerre.pipeline.engine import DiffusionEngine
from daguerre.pipeline.models import clip_tokenizer, describe_model, load_model, save_model
from daguerre.pipeline.schema import ImageRequest


def test_clip_tokenizer_gives_openai_ids():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    # OpenAI CLIP: <|startoftext|>=49406, "a</w>"=320, "photo</w>"=1125, "of</w>"=539, <|endoftext|>=49407
    assert tokenizer("a photo of")["input_ids"] == [49406, 320, 1125, 539, 49407]


def test_presets_are_seeded():
    a, b = load_model("tiny"), load_model("tiny")
    assert a.weights_hash == b.weights_hash and a.weights_hash.startswith("sha256:")


@pytest.mark.parametrize(("name", "params"), [("sd15", 859_520_964), ("sdxl", 2_567_463_684)])
def test_real_architectures_on_meta_device(name, params):
    model = load_model(name, meta=True)
    assert model.unet.device.type == "meta"
    assert sum(p.numel() for p in model.unet.parameters()) == params
    assert model.vae_scale_factor == 8
    assert model.is_sdxl == (name == "sdxl")


def test_diffusers_folder_round_trip(tmp_path, tiny_engine):
    folder = save_model(tiny_engine.model, tmp_path / "tiny-folder")
    assert (folder / "model_index.json").is_file() and (folder / "unet").is_dir()
    assert describe_model(str(folder)).startswith("diffusers folder")
    engine = DiffusionEngine(EngineConfig(model=str(folder), device="cpu"))
    assert engine.model.weights_hash.startswith("sha256:")
    request = ImageRequest(id="x", prompt="a lighthouse", seed=7, steps=3)
    ours = engine.generate([request])[0].image
    reference = tiny_engine.generate([request])[0].image
    assert ours.shape == (64, 64, 3)
    assert np.array_equal(ours, reference)


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="model_index.json"):
        describe_model(str(tmp_path))
