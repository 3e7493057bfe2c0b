"""Images in, the engine's part (pipeline/image_inputs.py): img2img in the one hot path,
against diffusers' own StableDiffusionImg2ImgPipeline on the same saved weights, seeds and
scheduler, with the seed contract (alone == in any batch) and strength deciding the steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from daguerre.pipeline.config import EngineConfig
from daguerre.pipeline.engine import DiffusionEngine
from daguerre.pipeline.image_inputs import ImageInput, start_step
from daguerre.pipeline.schema import ImageRequest

SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                     "euler_a": "EulerAncestralDiscreteScheduler",
                     "dpmpp_2m": "DPMSolverMultistepScheduler"}  # fmt: skip


def photo(seed: int, side: int = 64) -> np.ndarray:
    """A product-photo stand-in: a gradient with a bright square, uint8 [side, side, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    image = np.stack([x, y, 1 - x], axis=-1) * 200 + rng.uniform(0, 30, (side, side, 3))
    a, b = sorted(rng.integers(8, side - 8, 2))
    image[a:b, a:b] = 240
    return image.clip(0, 255).astype(np.uint8)


def req(i: int, **kw) -> ImageRequest:
    return ImageRequest(**{"id": f"i{i}", "prompt": f"a lamp, style {i}", "seed": 20 + i,
                           "steps": 5, "width": 64, "height": 64, **kw})  # fmt: skip


@pytest.fixture(scope="module")
def engine():
    return DiffusionEngine(EngineConfig(model="tiny", device="cpu"))


@pytest.fixture(scope="module")
def peer(engine, tmp_path_factory):
    from daguerre.pipeline.model_build import save_model
    from diffusers import StableDiffusionImg2ImgPipeline

    folder = save_model(engine.model, tmp_path_factory.mktemp("img2img") / "tiny")
    ours = DiffusionEngine(EngineConfig(model=str(folder), device="cpu"))
    return ours, StableDiffusionImg2ImgPipeline.from_pretrained(str(folder), local_files_only=True)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
def test_img2img_matches_diffusers_pipeline(peer, scheduler):
    import diffusers
    from PIL import Image

    ours, pipe = peer
    pipe.scheduler = getattr(diffusers, SCHEDULER_CLASSES[scheduler]).from_config(
        pipe.scheduler.config, **({"algorithm_type": "dpmsolver++", "solver_order": 2}
                                  if scheduler == "dpmpp_2m" else {}))  # fmt: skip
    seeds, strength = [3, 4], 0.6
    inits = [photo(s) for s in seeds]
    requests = [req(s, seed=s, scheduler=scheduler, negative_prompt="dark") for s in seeds]
    made = ours.generate(requests, [ImageInput(p, strength) for p in inits])
    theirs = pipe(
        prompt=[r.prompt for r in requests], negative_prompt=["dark"] * 2,
        image=[Image.fromarray(p) for p in inits], strength=strength, num_inference_steps=5,
        guidance_scale=7.5, output_type="np",
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
    ).images  # fmt: skip
    theirs = (np.asarray(theirs) * 255).round().astype(int)
    ours_pixels = np.stack([g.image for g in made]).astype(int)
    assert ours_pixels.shape == theirs.shape
    assert np.abs(ours_pixels - theirs).mean() <= 1.0  # mean abs difference <= 1/255


def test_alone_equals_in_a_mixed_batch(engine):
    """The same img2img request alone and beside text-only requests, another strength (its
    own loop) and the same strength (one loop): the same image within 1/255."""
    target, init = req(0, scheduler="euler_a"), ImageInput(photo(0), 0.6)
    alone = engine.generate([target], [init])[0]
    mates = [req(1, scheduler="euler_a"), req(2, scheduler="euler_a"), req(3, scheduler="euler_a")]
    out = engine.generate([mates[0], target, mates[1], mates[2]],
                          [None, init, ImageInput(photo(2), 0.6), ImageInput(photo(3), 0.4)])  # fmt: skip
    assert [g.batch_size for g in out] == [1, 2, 2, 1]  # text / strength 0.6 / strength 0.4
    assert np.abs(alone.image.astype(int) - out[1].image.astype(int)).max() <= 1
    assert alone.image.std() > 0


def test_strength_decides_the_steps_run_and_how_far_the_image_moves(engine):
    calls: list[int] = []
    hook = engine.model.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        low = engine.generate([req(0, steps=10)], [ImageInput(photo(0), 0.3)])[0]
        steps_low = len(calls)
        high = engine.generate([req(0, steps=10)], [ImageInput(photo(0), 0.9)])[0]
    finally:
        hook.remove()
    assert (steps_low, len(calls) - steps_low) == (3, 9)  # int(steps * strength), as diffusers
    # the round trip through the VAE alone moves a random-weight tiny model's pixels a lot;
    # a low strength still stays nearer the photo than a high one
    distance = lambda g: np.abs(g.image.astype(int) - photo(0).astype(int)).mean()  # noqa: E731
    assert distance(low) < distance(high)


def test_bad_inputs_say_what_is_wrong(engine, tmp_path):
    """Each bad init image is refused alone, naming its field (request_errors), and a call
    that skips that check fails with the same line."""
    from daguerre.pipeline.config import RequestRefused

    with pytest.raises(ValueError, match="strength: 0 is out of range"):
        ImageInput(photo(0), 0)
    with pytest.raises(ValueError, match=r"pixels must be uint8 \[H, W, 3\]"):
        ImageInput(photo(0)[..., 0], 0.5)
    assert start_step(5, 0.6) == 2 and start_step(5, 1.0) == 0
    inputs = [ImageInput(photo(0), 0.05), ImageInput(photo(0, side=48), 0.5), None,
              ImageInput(photo(0), 0.5)]  # fmt: skip
    failed = engine.request_errors([req(i) for i in range(4)], inputs)
    assert sorted(failed) == [0, 1]
    assert (failed[0].field, failed[1].field) == ("strength", "init_image")
    assert "0.05 of 5 steps runs no step" in str(failed[0])
    assert "48x48 pixels for a 64x64 image" in str(failed[1])
    with pytest.raises(RequestRefused, match="48x48 pixels for a 64x64 image"):
        engine.generate([req(0)], [inputs[1]])
    with pytest.raises(ValueError, match="1 init images for 2 requests"):
        engine.generate([req(0), req(1)], [inputs[3]])
    flux = DiffusionEngine(EngineConfig(model="tiny-flux", device="cpu"))
    masked = ImageInput(photo(0), 0.5, square_mask())
    [refused] = flux.request_errors([req(0, scheduler="euler")], [masked]).values()
    assert refused.field == "mask_image" and "runs on UNet models so far" in str(refused)
    assert not flux.request_errors([req(0, scheduler="euler")], [inputs[3]])  # img2img runs


# -- inpainting: masked latent blending on a 4-channel UNet ----------------------------------


def square_mask(side: int = 64) -> np.ndarray:
    """White (paint) in the middle square, black (keep) around it: uint8 [side, side]."""
    mask = np.zeros((side, side), np.uint8)
    mask[16:48, 16:48] = 255
    return mask


@pytest.mark.parametrize(
    ("scheduler", "strength"), [("ddim", 1.0), ("euler", 0.7), ("ddim", 0.6), ("euler_a", 1.0)]
)
def test_inpainting_matches_diffusers_pipeline(peer, scheduler, strength):
    from diffusers import StableDiffusionInpaintPipeline

    ours, img2img = peer
    pipe = StableDiffusionInpaintPipeline(**img2img.components)
    made, theirs = inpaint_both(ours, pipe, scheduler, strength, [square_mask()] * 2)
    assert np.abs(made - theirs).mean() <= 1.0  # mean abs difference <= 1/255


def inpaint_both(ours: DiffusionEngine, pipe, scheduler: str, strength: float,
                 masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Photos 5 and 6 inpainted under `masks` by the engine and by diffusers' pipeline on the
    same weights, seeds and scheduler: (ours, theirs), int [2, H, W, 3]."""
    import diffusers
    from PIL import Image

    pipe.scheduler = getattr(diffusers, SCHEDULER_CLASSES[scheduler]).from_config(
        pipe.scheduler.config
    )
    seeds = [5, 6]
    inits = [photo(s) for s in seeds]
    requests = [req(s, seed=s, scheduler=scheduler) for s in seeds]
    images = [ImageInput(p, strength, m) for p, m in zip(inits, masks, strict=True)]
    made = ours.generate(requests, images)
    theirs = pipe(
        prompt=[r.prompt for r in requests], image=[Image.fromarray(p) for p in inits],
        mask_image=[Image.fromarray(m) for m in masks], strength=strength,
        num_inference_steps=5, guidance_scale=7.5, height=64, width=64, output_type="np",
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
    ).images  # fmt: skip
    theirs = (np.asarray(theirs) * 255).round().astype(int)
    return np.stack([g.image for g in made]).astype(int), theirs


def test_inpainting_keeps_what_the_mask_keeps(engine):
    """Where the mask keeps (black), the latents the VAE decodes are the init image's own
    (the VAE's round trip of it: a decoder with attention still mixes in some of the painted
    region, so pixels are compared where they can be: in the latents); where it paints,
    something else. Alone == in a batch with another mask."""
    init = photo(7)
    target = ImageInput(init, 1.0, square_mask())
    decoded: list[torch.Tensor] = []
    hook = engine.model.vae.decoder.register_forward_pre_hook(lambda _, a: decoded.append(a[0]))
    try:
        alone = engine.generate([req(7)], [target])[0].image.astype(int)
        with torch.inference_mode():  # the init image's latents, drawn as the engine draws them
            latents = engine.denoiser.encode_images(init[None], [torch.Generator().manual_seed(27)])
            engine.model.vae.decode(engine.denoiser.to_vae(latents, 0, 0))
    finally:
        hook.remove()
    made, own = decoded
    factor = engine.model.vae_scale_factor
    keep = torch.from_numpy(square_mask()[::factor, ::factor] == 0)
    assert torch.allclose(made[0][:, keep], own[0][:, keep], atol=1e-5)
    assert (made[0][:, ~keep] - own[0][:, ~keep]).abs().mean() > 0.1
    other = ImageInput(photo(8), 1.0, 255 - square_mask())
    batch = engine.generate([req(8), req(7)], [other, target])
    assert np.abs(batch[1].image.astype(int) - alone).max() <= 1
    with pytest.raises(ValueError, match="mask: must be uint8"):
        ImageInput(init, 1.0, square_mask(48))


# -- inpainting on a 9-channel inpainting UNet (sd-v1-5-inpainting's shape) -----------------


@pytest.fixture(scope="module")
def inpainting_peer(engine, tmp_path_factory):
    """The tiny model saved with a 9-channel UNet (seeded random weights), loaded by the
    engine and by diffusers' StableDiffusionInpaintPipeline from the same folder."""
    from daguerre.pipeline.model_build import save_model
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    folder = save_model(engine.model, tmp_path_factory.mktemp("inpaint9") / "tiny-inpainting")
    config = dict(engine.model.unet.config)
    config["in_channels"] = 9
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    ours = DiffusionEngine(EngineConfig(model=str(folder), device="cpu"))
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(folder), local_files_only=True)
    return ours, pipe


@pytest.mark.parametrize(("scheduler", "strength"), [("ddim", 1.0), ("euler_a", 1.0),
                                                     ("euler", 0.7)])  # fmt: skip
def test_nine_channel_inpainting_matches_diffusers_pipeline(inpainting_peer, scheduler, strength):

    ours, pipe = inpainting_peer
    masks = [square_mask(), 255 - square_mask()]
    made, theirs = inpaint_both(ours, pipe, scheduler, strength, masks)
    assert np.abs(made - theirs).mean() <= 1.0  # mean abs difference <= 1/255
    alone = ours.generate([req(6, seed=6, scheduler=scheduler)],
                          [ImageInput(photo(6), strength, masks[1])])[0]  # fmt: skip
    assert np.abs(alone.image.astype(int) - made[1]).max() <= 1


def test_an_inpainting_unet_refuses_what_is_not_inpainting(inpainting_peer):
    ours, _ = inpainting_peer
    failed = ours.request_errors([req(0), req(1)], [None, ImageInput(photo(1), 0.5)])
    assert sorted(failed) == [0, 1] and {f.field for f in failed.values()} == {"mask_image"}
    assert "inpainting UNet (9 input channels)" in str(failed[0])
