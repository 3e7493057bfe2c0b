"""Presets build offline with seeded weights; real diffusers folders load; the tokenizer is CLIP's."""

from __future__ import annotations

import numpy as np
import pytest
from daguerre.pipeline.config import ConfigError, EngineConfig
from daguerre.pipeline.engine import DiffusionEngine
from daguerre.pipeline.model_build import save_model
from daguerre.pipeline.models import describe_model, load_model
from daguerre.pipeline.schema import ImageRequest
from daguerre.pipeline.tokenizer import clip_tokenizer


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
    info = describe_model(str(folder))
    assert info.kind == "folder" and info.default_size == 64 and not info.random_weights
    engine = DiffusionEngine(EngineConfig(model=str(folder), device="cpu"))
    assert engine.model.weights_hash.startswith("sha256:")
    assert info.weights_hash() == engine.model.weights_hash  # what the driver compares on resume
    request = ImageRequest(id="x", prompt="a lighthouse", seed=7, steps=3)
    ours = engine.generate([request])[0].image
    reference = tiny_engine.generate([request])[0].image
    assert ours.shape == (64, 64, 3)
    assert np.array_equal(ours, reference)


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="model_index.json"):
        describe_model(str(tmp_path))


def test_preset_weights_hash_is_known_without_building(tiny_engine):
    info = describe_model("tiny")
    assert info.random_weights and "noise" in info.describe()
    assert info.weights_hash() == tiny_engine.model.weights_hash


def test_hub_id_gets_a_hint():
    with pytest.raises(ConfigError, match="looks like a Hugging Face Hub id.*--local-dir DIR"):
        describe_model("stabilityai/stable-diffusion-xl-base-1.0")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_engine):
    return save_model(tiny_engine.model, tmp_path_factory.mktemp("m") / "tiny")


def _broken_copy(tiny_folder, tmp_path, edit):
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(tiny_folder, copy)
    edit(copy)
    return str(copy)


def test_incomplete_folders_are_named_before_loading(tiny_folder, tmp_path):
    import json
    import shutil

    def no_class_name(folder):
        index = json.loads((folder / "model_index.json").read_text())
        del index["_class_name"]
        (folder / "model_index.json").write_text(json.dumps(index))

    with pytest.raises(ConfigError, match="model_index.json has no _class_name"):
        describe_model(_broken_copy(tiny_folder, tmp_path / "a", no_class_name))
    with pytest.raises(ConfigError, match="lists the component 'vae' but has no vae/ folder"):
        describe_model(_broken_copy(tiny_folder, tmp_path / "b",
                                    lambda f: shutil.rmtree(f / "vae")))  # fmt: skip

    def no_weights(folder):
        for weights in (folder / "unet").glob("*.safetensors"):
            weights.unlink()

    with pytest.raises(ConfigError, match="unet/ has no weights"):
        describe_model(_broken_copy(tiny_folder, tmp_path / "c", no_weights))
