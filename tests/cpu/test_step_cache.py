"""The `cached` speed tier (step caching, kernels/deep_cache.py): its shallow branch is the
UNet's own, it skips the deep UNet between full steps, and the seed contract holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from daguerre.kernels.deep_cache import DeepCacheUNet
from daguerre.pipeline.config import EngineConfig
from daguerre.pipeline.engine import DiffusionEngine
from daguerre.pipeline.schema import ImageRequest, validate_request

STEPS = 6


def req(i: int, **kw) -> ImageRequest:
    return ImageRequest(**{"id": f"c{i}", "prompt": f"a shop window {i}", "seed": 40 + i,
                           "steps": STEPS, "speed": "cached", **kw})  # fmt: skip


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module", params=["tiny", "tiny-xl"])
def engine(request):
    return DiffusionEngine(EngineConfig(model=request.param, cache_interval=3))


def _unet_inputs(engine: DiffusionEngine):
    unet = engine.model.unet
    side = engine.model.default_size // engine.model.vae_scale_factor
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, side, side, generator=gen)
    text, pooled = engine.encode_prompts(["", "a lamp"])
    added = None
    if engine.model.is_sdxl:
        time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
        added = {"text_embeds": pooled, "time_ids": time_ids}
    return sample, torch.tensor(500), text, added


@torch.inference_mode()
def test_the_shallow_branch_over_features_kept_at_the_same_step_is_the_full_unet(engine):
    cache = DeepCacheUNet(engine.model.unet, interval=3)
    sample, t, text, added = _unet_inputs(engine)
    full = cache(0, sample, t, text, added)
    shallow = cache.shallow(sample, t, text, added)
    assert cache.kept is not None and shallow.shape == full.shape
    assert torch.allclose(full, shallow, atol=1e-5), (full - shallow).abs().max()


def test_cached_runs_the_deep_unet_only_every_interval_steps(engine):
    deep_calls = []
    hook = engine.model.unet.mid_block.register_forward_hook(lambda *_: deep_calls.append(1))
    try:
        engine.generate([req(0)])
    finally:
        hook.remove()
    assert len(deep_calls) == 2  # steps 0 and 3 of 6
    assert engine.denoiser.step_cache().cached_steps >= 4


def test_cached_alone_equals_in_a_batch_and_never_shares_one_with_exact(engine):
    target = req(0, scheduler="euler_a", negative_prompt="blurry")
    alone = engine.generate([target])[0]
    same = {"scheduler": "euler_a"}  # one bucket but for the tier
    mixed = [req(1, **same), target.model_copy(update={"id": "t2"}), req(2, **same),
             req(3, speed="exact", **same), req(4, speed="exact", **same)]  # fmt: skip
    out = engine.generate(mixed)
    assert [g.batch_size for g in out] == [3, 3, 3, 2, 2]  # tiers never share a batch
    assert max_diff(alone.image, out[1].image) <= 1  # within 1/255
    exact = engine.generate([ImageRequest(**{**target.model_dump(), "speed": "exact"})])[0]
    assert max_diff(alone.image, exact.image) > 0  # a different, cheaper computation


def test_speed_is_a_manifest_column_recorded_and_fingerprinted(engine):
    from daguerre.pipeline.files import Provenance
    from daguerre.pipeline.outputs import write_outputs

    cached = validate_request({"id": "a", "prompt": "p", "speed": "cached"})
    exact = validate_request({"id": "a", "prompt": "p"})
    assert cached.speed.value == "cached" and exact.speed.value == "exact"
    assert cached.fingerprint(64, 64) != exact.fingerprint(64, 64)
    bad = validate_request({"id": "a", "prompt": "p", "speed": "turbo"})
    assert isinstance(bad, list) and bad[0].field == "speed"
    provenance = Provenance(model="tiny", weights_hash="h", backend=engine.backend,
                            node_id="n", actor_id="a")  # fmt: skip
    [stored] = write_outputs([(engine.generate([req(9)])[0], provenance)], None, run_id="r",
                             version="0")  # fmt: skip
    assert stored.record.speed == "cached"


def test_an_interval_below_two_is_refused():
    from daguerre.pipeline.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="cache_interval"):
        validate_config(EngineConfig, {"cache_interval": 1})
