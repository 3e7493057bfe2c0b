"""The transformer denoisers (SD3, FLUX) on the compile backends (kernels/transformer.py):
ONNX export + ONNX Runtime against torch from one dynamic-batch graph, the engine on
onnxruntime against eager, torch.compile's batch buckets, TensorRT up to the engine build."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch
from daguerre.kernels.transformer import (
    CompiledTransformer,
    OnnxRuntimeTransformer,
    TransformerRunner,
    make_transformer_runner,
    signature_of,
    trt_transformer_profile,
)
from daguerre.kernels.unet import BackendUnavailable, batch_buckets
from daguerre.pipeline.config import EngineConfig
from daguerre.pipeline.engine import DiffusionEngine
from daguerre.pipeline.schema import ImageRequest

needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                               reason="onnxruntime is not installed (onnx extra)")  # fmt: skip
FAMILIES = ["tiny-sd3", "tiny-flux"]


@pytest.fixture(scope="module", params=FAMILIES)
def eager(request):
    return DiffusionEngine(EngineConfig(model=request.param, device="cpu"))


def call_inputs(engine: DiffusionEngine, rows: int, seed: int) -> dict:
    """One transformer call's inputs on `rows` rows, random, as the engine passes them."""
    gen = torch.Generator().manual_seed(seed)
    inputs = engine.denoiser.forward_inputs(rows, 64, 64)
    out = {k: None if v is None else torch.randn(v.shape, generator=gen) for k, v in inputs.items()}
    out["timestep"] = torch.rand(rows, generator=gen) * (
        1 if engine.model.family == "flux" else 1000
    )
    if engine.model.family == "flux":  # position ids as the engine makes them, not noise
        out["txt_ids"], out["img_ids"] = inputs["txt_ids"], inputs["img_ids"] + 1
    return out


def rel_l2(a, b) -> float:
    return (torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double())).item()


@needs_ort
@pytest.mark.timeout(300)
def test_onnxruntime_matches_torch_from_one_dynamic_batch_graph(eager, cache):
    import onnx

    transformer = eager.model.transformer
    runner = OnnxRuntimeTransformer(transformer, f"test-{eager.model.name}")
    [path] = runner.prepare(call_inputs(eager, 1, 0))  # traced on one row, still any batch
    graph = onnx.load(str(path))
    onnx.checker.check_model(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 18
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # one graph, any batch
    with torch.no_grad():
        for rows in (1, 3, 6):
            inputs = call_inputs(eager, rows, rows)
            expected = TransformerRunner(transformer)(inputs)
            got = runner(inputs)
            assert got.shape == expected.shape
            assert rel_l2(got, expected) < 1e-4, rows
    assert len(list(cache.glob("onnx/*/transformer.onnx"))) >= 1
    assert len(runner.sessions) == 1  # every batch size through the one graph


@needs_ort
@pytest.mark.timeout(300)
def test_engine_on_onnxruntime_makes_the_eager_images(eager, cache):
    config = EngineConfig(model=eager.model.name, device="cpu", unet_backend="onnxruntime")
    onnx_engine = DiffusionEngine(config, eager.model)
    family = eager.model.family
    requests = [ImageRequest(id=f"o{i}", prompt=f"a chair {i}", seed=i, steps=3,
                             scheduler=scheduler) for i, scheduler in
                enumerate(["euler", "euler", "euler_a", "dpmpp_2m"])]  # fmt: skip
    for made, reference in zip(
        onnx_engine.generate(requests), eager.generate(requests), strict=True
    ):
        diff = np.abs(made.image.astype(int) - reference.image.astype(int)).max()
        assert diff <= 2, (made.request.id, diff)  # within 2/255, as the UNet's backends
    assert onnx_engine.backend["transformer"] == f"{family} onnxruntime"
    assert onnx_engine.backend["speed_cached"] == "eager"  # what a cached image ran on
    cached = onnx_engine.generate([ImageRequest(**{**requests[0].model_dump(), "speed": "cached"})])
    assert cached[0].image.std() > 0  # cached loops run the eager module (the hooks' home)


def test_torch_compile_pads_to_a_few_buckets(eager):
    """Every engine batch 1..8 runs through at most one graph per bucket, CFG-doubled rows
    for SD3, and padding never changes the real rows."""
    import torch._dynamo

    transformer = eager.model.transformer
    rows_per_image = 2 if eager.model.family == "sd3" else 1
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(len(example_inputs))
        return graph_module.forward

    torch._dynamo.reset()
    runner = CompiledTransformer(transformer, "w", max_batch_size=8, rows_per_image=rows_per_image)
    runner.compiled = torch.compile(transformer, backend=counting_backend, dynamic=False)
    assert runner.buckets == tuple(rows_per_image * b for b in batch_buckets(8))
    with torch.no_grad():
        for batch in range(1, 9):
            inputs = call_inputs(eager, rows_per_image * batch, batch)
            assert rel_l2(runner(inputs), TransformerRunner(transformer)(inputs)) < 1e-5
    torch._dynamo.reset()
    assert 1 <= len(graphs) <= len(batch_buckets(8)), graphs


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torch_compile_matches_eager():
    engine = DiffusionEngine(EngineConfig(model="tiny-flux", device="cpu"))
    compiled = DiffusionEngine(EngineConfig(model="tiny-flux", device="cpu", unet_backend="compile",
                                            max_batch_size=1), engine.model)  # fmt: skip
    request = ImageRequest(id="c", prompt="a lamp", seed=3, steps=2)
    made, reference = compiled.generate([request])[0], engine.generate([request])[0]
    assert np.abs(made.image.astype(int) - reference.image.astype(int)).max() <= 1
    assert compiled.backend["transformer"] == "flux compile"


def test_tensorrt_profile_is_the_graphs_inputs_over_the_engine_batch_range(eager):
    """One definition: the profile names exactly the exported graph's inputs, each with
    the call's shape, from one image (CFG-doubled for SD3) to max_batch_size images."""
    rows_per_image = 2 if eager.model.family == "sd3" else 1
    inputs = {k: v for k, v in call_inputs(eager, rows_per_image, 0).items() if v is not None}
    signature = signature_of(inputs, torch.float32)
    profile = trt_transformer_profile(signature, 4, rows_per_image)
    assert list(profile) == signature.input_names == list(inputs)
    for name, tensor in inputs.items():
        low, opt, high = profile[name]
        if name in ("txt_ids", "img_ids"):
            assert low == opt == high == tuple(tensor.shape)
        else:
            assert low == (rows_per_image, *tensor.shape[1:])
            assert high == opt == (4 * rows_per_image, *tensor.shape[1:])


def test_tensorrt_says_why_it_cannot_run(eager):
    from daguerre.kernels.tensorrt import tensorrt_unavailable

    reason = tensorrt_unavailable()
    if reason is None:
        pytest.skip("tensorrt and CUDA are present: the GPU check covers the build")
    with pytest.raises(BackendUnavailable, match=re.escape(f"unet_backend tensorrt: {reason}")):
        make_transformer_runner(eager.model.transformer, "tensorrt", "w")


# -- the attention registry inside the transformers (kernels/dit_attention.py) --------------


@pytest.mark.parametrize("fuse", [False, True])
def test_our_processors_on_sdpa_are_diffusers_processors(eager, fuse):
    from daguerre.kernels.dit_attention import install_dit_attention
    from daguerre.pipeline.model_build import build_preset
    from daguerre.pipeline.models import get_preset

    transformer = build_preset(get_preset(eager.model.name)).transformer
    if fuse:
        transformer.fuse_qkv_projections()
    inputs = call_inputs(eager, 2, 5)
    with torch.no_grad():
        reference = TransformerRunner(transformer)(inputs)
        dispatch = install_dit_attention(transformer, eager.model.family, "sdpa", "cpu")
        ours = TransformerRunner(transformer)(inputs)
    assert torch.allclose(ours, reference, atol=1e-6), (ours - reference).abs().max()
    blocks = len(transformer.transformer_blocks) + len(
        getattr(transformer, "single_transformer_blocks", [])
    )
    assert dispatch.calls == {"sdpa": blocks}  # every attention layer went through the dispatch


@needs_ort
@pytest.mark.timeout(300)
def test_a_graph_built_ahead_is_the_one_requests_use(cache):
    """`daguerre compile` (engine.prepare) and a request reach the same cached graph: the
    inputs of a call are ordered by name, not by the order the denoiser made them in."""
    config = EngineConfig(model="tiny-flux", device="cpu", unet_backend="onnxruntime")
    engine = DiffusionEngine(config)
    [path] = engine.prepare(64, 64)
    engine.generate([ImageRequest(id="a", prompt="a lamp", seed=1, steps=2)])
    runner = engine.denoiser.runner
    assert len(runner.sessions) == 1
    assert [p for p in cache.glob("onnx/*/transformer.onnx") if p.parent == path.parent] == [path]


def test_a_cached_loop_leaves_a_compiled_graph_valid(eager):
    """The TaylorSeer hooks come off after a cached loop without leaving a `forward` on the
    modules' instances, so the compiled graph's guards still hold: no recompile."""
    import torch._dynamo

    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(1)
        return graph_module.forward

    torch._dynamo.reset()
    config = EngineConfig(model=eager.model.name, device="cpu", unet_backend="compile",
                          max_batch_size=1)  # fmt: skip
    engine = DiffusionEngine(config, eager.model)
    transformer = eager.model.transformer
    engine.denoiser.runner.compiled = torch.compile(transformer, backend=counting_backend,
                                                    dynamic=False)  # fmt: skip
    exact = ImageRequest(id="e", prompt="a lamp", seed=1, steps=3)
    engine.generate([exact])
    compiled = len(graphs)
    engine.generate([ImageRequest(**{**exact.model_dump(), "speed": "cached"})])
    assert not [m for m in transformer.modules() if "forward" in m.__dict__]
    engine.generate([exact])
    torch._dynamo.reset()
    assert compiled >= 1 and len(graphs) == compiled


def test_fused_projections_keep_sd35s_qk_norms():
    """SD3.5 normalises q and k (qk_norm); diffusers' fused SD3 processor skips that, so
    fused projections run through our processor, which does not."""
    from daguerre.pipeline.model_build import build_preset
    from daguerre.pipeline.models import get_preset

    preset = get_preset("tiny-sd3")
    preset = preset.model_copy(
        update={"transformer": {**preset.transformer, "qk_norm": "rms_norm"}}
    )
    plain = DiffusionEngine(EngineConfig(model="tiny-sd3", device="cpu"), build_preset(preset))
    fused = DiffusionEngine(EngineConfig(model="tiny-sd3", device="cpu", fuse_qkv=True),
                            build_preset(preset))  # fmt: skip
    request = ImageRequest(id="q", prompt="a lamp", negative_prompt="dark", seed=2, steps=3)
    made, reference = fused.generate([request])[0], plain.generate([request])[0]
    assert np.abs(made.image.astype(int) - reference.image.astype(int)).max() <= 1
    assert fused.backend["attention"] == "sdpa"
