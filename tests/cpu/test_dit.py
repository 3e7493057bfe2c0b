"""The transformer families (SD3, FLUX) through the engine: the seed contract per
scheduler, diffusers' own pipelines as the peer on the same saved weights, folder round
trips, per-row refusals, and the FLOPs of the real shapes against a hand derivation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from daguerre.pipeline.config import ConfigError, EngineConfig, RequestRefused
from daguerre.pipeline.engine import DiffusionEngine
from daguerre.pipeline.schema import ImageRequest

FAMILIES = ["tiny-sd3", "tiny-flux"]
SCHEDULERS = ["euler", "euler_a", "dpmpp_2m"]


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request):
    return DiffusionEngine(EngineConfig(model=request.param, device="cpu"))


def req(engine: DiffusionEngine, i: int, **kw) -> ImageRequest:
    base = {"id": f"r{i}", "prompt": f"a product photo, object {i}", "seed": 40 + i, "steps": 4,
            "guidance_scale": 3.0 + i, "scheduler": "euler"}  # fmt: skip
    if engine.model.family != "flux":
        base["negative_prompt"] = f"blurry {i}" if i % 2 else ""
    return ImageRequest(**{**base, **kw})


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_alone_equals_in_a_mixed_batch(engine, scheduler):
    """Same request, same image alone and between batch-mates with other prompts, seeds,
    guidance and negative prompts (within 1/255), for every flow scheduler."""
    target = req(engine, 0, scheduler=scheduler)
    alone = engine.generate([target])[0]
    mates = [req(engine, i, scheduler=scheduler) for i in (1, 2, 3)]
    together = engine.generate([mates[0], target, *mates[1:]])
    assert alone.image.shape == (64, 64, 3) and alone.image.std() > 0
    assert max_diff(alone.image, together[1].image) <= 1
    assert together[1].batch_size == 4
    assert len({together[i].image.tobytes() for i in range(4)}) == 4  # per-request inputs count


def test_seed_and_guidance_change_the_image(engine):
    base = engine.generate([req(engine, 0)])[0].image
    assert max_diff(base, engine.generate([req(engine, 0, seed=999)])[0].image) > 1
    assert max_diff(base, engine.generate([req(engine, 0, guidance_scale=9.0)])[0].image) > 1


def test_metadata_says_what_ran(engine):
    made = engine.generate([req(engine, 0)])[0]
    assert engine.backend["transformer"] == f"{engine.model.family} eager"
    assert "FlowMatchEulerDiscreteScheduler" in made.scheduler_config
    if engine.model.family == "flux":
        assert '"mu"' in made.scheduler_config  # FLUX.1-dev's resolution-dependent shift
    assert made.timings.denoise_s > 0


def test_refusals_are_per_row(engine):
    """ddim has no flow form; FLUX takes no negative prompt; sizes off the 16-pixel grid:
    each a RequestRefused naming the field, the other requests still made."""
    from daguerre.pipeline.engine_thread import generate_each

    bad = [req(engine, 1, scheduler="ddim"), req(engine, 2, width=72)]
    if engine.model.family == "flux":
        bad.append(req(engine, 3, negative_prompt="blurry"))
    results = generate_each(engine, [*bad, req(engine, 0)])
    fields = [r.field for r in results[:-1]]
    assert fields == ["scheduler", "size", "negative_prompt"][: len(bad)]
    assert all(isinstance(r, RequestRefused) for r in results[:-1])
    assert "use euler, euler_a, dpmpp_2m" in str(results[0])
    assert results[-1].image.shape == (64, 64, 3)


def test_unet_only_options_are_refused_at_start():
    with pytest.raises(ConfigError, match="channels_last: True is for UNet models; tiny-flux"):
        DiffusionEngine(EngineConfig(model="tiny-flux", device="cpu", channels_last=True))


def test_lora_is_refused_per_row_for_transformers(engine, tmp_path):
    failed = engine.request_errors([req(engine, 0, lora=str(tmp_path / "style.safetensors"))])
    assert failed[0].field == "lora" and "needs a UNet model" in str(failed[0])


@pytest.fixture(scope="module")
def saved(engine, tmp_path_factory):
    from daguerre.pipeline.model_build import save_model

    return save_model(engine.model, tmp_path_factory.mktemp("dit") / engine.model.name)


def test_folder_round_trip(engine, saved):
    """A diffusers folder saved from the preset loads back (family, native side, T5 length
    from the saved tokenizer) and makes the same image."""
    from daguerre.pipeline.models import describe_model

    info = describe_model(str(saved))
    assert (info.family, info.default_size) == (engine.model.family, 64)
    loaded = DiffusionEngine(EngineConfig(model=str(saved), device="cpu"))
    assert loaded.model.text_max_length == engine.model.text_max_length == 32
    request = req(engine, 0, width=None, height=None)
    assert max_diff(loaded.generate([request])[0].image, engine.generate([request])[0].image) <= 1


def test_matches_diffusers_pipeline(engine, saved):
    """The peer: diffusers' StableDiffusion3Pipeline / FluxPipeline on the same folder, seed,
    guidance, negative prompt and scheduler (mean abs pixel difference <= 1/255)."""
    from diffusers import DiffusionPipeline

    request = req(engine, 1)
    pipe = DiffusionPipeline.from_pretrained(str(saved), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": request.prompt, "num_inference_steps": request.steps,
              "guidance_scale": request.guidance_scale, "height": 64, "width": 64,
              "generator": torch.Generator().manual_seed(request.seed), "output_type": "np",
              "max_sequence_length": engine.model.text_max_length}  # fmt: skip
    if request.negative_prompt:
        kwargs["negative_prompt"] = request.negative_prompt
    theirs = (pipe(**kwargs).images[0] * 255).round()
    ours = engine.generate([request])[0].image.astype(float)
    assert np.abs(theirs - ours).mean() <= 1.0
    assert np.abs(theirs - ours).max() <= 2


def test_t5_tokenizer_is_t5_shaped():
    from daguerre.pipeline.tokenizer import t5_tokenizer

    tokenizer = t5_tokenizer(16)
    assert len(tokenizer) == 32100
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer(["a photo of a squirrel"], padding="max_length", max_length=16).input_ids[0]
    assert tokenizer.convert_ids_to_tokens(ids)[:6] == ["▁a", "▁photo", "▁of", "▁a", "▁squirrel",
                                                        "</s>"]  # fmt: skip
    assert len(ids) == 16 and ids[-1] == 0


# -- FLOPs of the real shapes at 1024x1024, one forward of one row ------------------------


def sd3_hand_flops(layers: int, dim: int, image: int = 4096, text: int = 77 + 256) -> float:
    """MMDiT: per joint block, both streams' linears 24 N D^2 (qkv 6, out 2, MLP 16) and
    attention over the joint sequence 4 N^2 D, adaLN-Zero 2 x Linear(D, 6D); the last block
    keeps only the context's qkv (6 Nt D^2) and a Linear(D, 2D) norm. Plus the patch
    embedding, context embedder, output projection and the time/pooled embedders."""
    n = image + text
    joint = 24 * n * dim**2 + 4 * n**2 * dim + 24 * dim**2
    last = 24 * image * dim**2 + 6 * text * dim**2 + 4 * n**2 * dim + 12 * dim**2 + 4 * dim**2
    io = 2 * image * 64 * dim + 2 * text * 4096 * dim + 2 * image * dim * 64 + 4 * dim**2
    embedders = 2 * 256 * dim + 2 * dim**2 + 2 * 2048 * dim + 2 * dim**2
    return (layers - 1) * joint + last + io + embedders


def flux_hand_flops(double: int = 19, single: int = 38, dim: int = 3072, image: int = 4096,
                    text: int = 512) -> float:  # fmt: skip
    """FLUX: double blocks as MMDiT's (24 N D^2 + 4 N^2 D + 24 D^2); single-stream blocks on
    the joint sequence: qkv 6, MLP in 8, fused out (5D -> D) 10 N D^2, attention 4 N^2 D,
    adaLN Linear(D, 3D); plus x/context embedders, output projection, time, guidance and
    pooled embedders."""
    n = image + text
    double_block = 24 * n * dim**2 + 4 * n**2 * dim + 24 * dim**2
    single_block = 24 * n * dim**2 + 4 * n**2 * dim + 6 * dim**2
    io = 2 * image * 64 * dim + 2 * text * 4096 * dim + 2 * image * dim * 64 + 4 * dim**2
    embedders = 2 * (2 * 256 * dim + 2 * dim**2) + 2 * 768 * dim + 2 * dim**2
    return double * double_block + single * single_block + io + embedders


@pytest.mark.parametrize("preset, hand", [
    ("sd3-medium", sd3_hand_flops(24, 1536)),
    ("flux-dev", flux_hand_flops()),
])  # fmt: skip
def test_transformer_flops_match_the_hand_derivation(preset, hand):
    from daguerre.pipeline.bench import transformer_forward_flops

    counted = transformer_forward_flops(preset, 1024, 1024)
    assert counted == pytest.approx(hand, rel=0.02)
    assert transformer_forward_flops(preset, 1024, 1024, batch=2) == pytest.approx(2 * counted)


def test_bench_counts_a_step_per_family():
    """A step is one CFG-doubled forward for SD3, one forward for FLUX."""
    from daguerre.pipeline.bench import count_flops, transformer_forward_flops

    sd3 = count_flops("tiny-sd3", None, 64, 64, 4)
    assert sd3["denoiser_step"] == pytest.approx(transformer_forward_flops("tiny-sd3", 64, 64, 2))
    flux = count_flops("tiny-flux", None, 64, 64, 4)
    assert flux["denoiser_step"] == pytest.approx(transformer_forward_flops("tiny-flux", 64, 64))
    assert flux["per_image"] == 4 * flux["denoiser_step"] + flux["vae_decode"]


def test_fused_qkv_gives_the_same_image(engine):
    fused = DiffusionEngine(EngineConfig(model=engine.model.name, device="cpu", fuse_qkv=True))
    request = req(engine, 0)
    assert fused.backend["hot_path"] == "fuse_qkv"
    assert max_diff(fused.generate([request])[0].image, engine.generate([request])[0].image) <= 1


# -- speed: cached (diffusers' TaylorSeer hooks, kernels/dit_cache.py) ----------------------


def test_cached_runs_the_blocks_only_on_the_schedules_full_steps(engine):
    steps = 8
    calls: list[int] = []
    first_attention = engine.model.transformer.transformer_blocks[0].attn
    hook = first_attention.register_forward_hook(lambda *_: calls.append(1))
    try:
        engine.generate([req(engine, 0, steps=steps, speed="cached")])
    finally:
        hook.remove()
    schedule = engine.denoiser.step_cache
    full = [i for i in range(steps) if schedule.is_full(i)]
    assert full == [0, 1, 3, 6]  # two warm-up steps, then every third (cache_interval 3)
    assert len(calls) == len(full)


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
def test_cached_alone_equals_in_a_batch_and_exact_is_untouched(engine, scheduler):
    """The seed contract for cached; tiers never share a batch; an exact image made after a
    cached loop is the exact image made before it (the hooks are gone)."""
    steps = {"steps": 8, "scheduler": scheduler}
    target = req(engine, 0, speed="cached", **steps)
    exact_before = engine.generate([req(engine, 0, **steps)])[0]
    alone = engine.generate([target])[0]
    mixed = [req(engine, 1, speed="cached", **steps), target, req(engine, 2, speed="cached", **steps),
             req(engine, 3, **steps), req(engine, 0, **steps)]  # fmt: skip
    out = engine.generate(mixed)
    assert [g.batch_size for g in out] == [3, 3, 3, 2, 2]
    assert max_diff(alone.image, out[1].image) <= 1
    assert max_diff(exact_before.image, out[4].image) <= 1
    assert np.array_equal(exact_before.image, engine.generate([req(engine, 0, **steps)])[0].image)
    difference = np.abs(alone.image.astype(int) - exact_before.image.astype(int)).mean()
    assert difference > 0  # a cheaper computation; close to exact on a deterministic sampler:
    assert difference < 8 or scheduler == "euler_a"  # (random tiny weights, 8 steps)


def _photo(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64] / 64
    image = np.stack([x, y, 1 - x], axis=-1) * 200 + rng.uniform(0, 40, (64, 64, 3))
    return image.clip(0, 255).astype(np.uint8)


def test_img2img_matches_diffusers_pipeline(engine, saved):
    """img2img on a flow-matching transformer: the photo's latents mixed with the noise at
    the start step's sigma, as StableDiffusion3Img2ImgPipeline / FluxImg2ImgPipeline do on
    the same folder and seed; the same request alone and beside a text-only one."""
    from daguerre.pipeline.image_inputs import ImageInput
    from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline
    from PIL import Image

    peer = FluxImg2ImgPipeline if engine.model.family == "flux" else StableDiffusion3Img2ImgPipeline
    pipe = peer.from_pretrained(str(saved), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    request = req(engine, 1, steps=5, width=64, height=64)
    kwargs = {"prompt": request.prompt, "image": Image.fromarray(_photo(1)), "strength": 0.6,
              "num_inference_steps": request.steps, "guidance_scale": request.guidance_scale,
              "height": 64, "width": 64, "output_type": "np",
              "generator": torch.Generator().manual_seed(request.seed),
              "max_sequence_length": engine.model.text_max_length}  # fmt: skip
    if request.negative_prompt:
        kwargs["negative_prompt"] = request.negative_prompt
    theirs = (pipe(**kwargs).images[0] * 255).round()
    init = ImageInput(_photo(1), 0.6)
    ours = engine.generate([request], [init])[0].image
    assert np.abs(theirs - ours.astype(float)).mean() <= 1.0
    batch = engine.generate([req(engine, 2, steps=5), request], [None, init])
    assert max_diff(batch[1].image, ours) <= 1
    masked = ImageInput(_photo(1), 0.6, np.full((64, 64), 255, np.uint8))
    [refused] = engine.request_errors([request], [masked]).values()
    assert refused.field == "mask_image" and "runs on UNet models so far" in str(refused)
