"""UNet backends: ONNX export + ONNX Runtime against torch, the whole job on onnxruntime,
TensorRT everything up to the engine build, torch.compile (slow on CPU)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from daguerre.kernels.compile import TorchCompileUNet, make_runner
from daguerre.kernels.onnx import OnnxRuntimeUNet
from daguerre.kernels.tensorrt import tensorrt_unavailable, trt_engine_key, trt_profile
from daguerre.kernels.unet import UNetSignature, batch_buckets, cache_key, signature_for
from daguerre.pipeline.model_build import build_preset
from daguerre.pipeline.models import get_preset

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed (onnx extra)")


def unet_inputs(unet, batch: int, size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=gen)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen)
    added = None
    sig = signature_for(unet, size, size, torch.float32, 77, 6)
    if sig.pooled_dim is not None:
        added = {"text_embeds": torch.randn(batch, sig.pooled_dim, generator=gen),
                 "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch,
                                          dtype=torch.float32)}  # fmt: skip
    return sample, torch.tensor(501), text, added


def rel_l2(a, b) -> float:
    return (torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double())).item()


@needs_ort
@pytest.mark.timeout(600)
@pytest.mark.parametrize("preset", ["tiny", "small", "tiny-xl"])
def test_onnxruntime_matches_torch(preset, cache):
    import onnx

    unet = build_preset(get_preset(preset)).unet.eval()
    runner = OnnxRuntimeUNet(unet, weights_hash=f"test-{preset}")
    [path] = runner.prepare(8, 8, 77, 6)
    onnx.checker.check_model(str(path))  # a valid graph (external data included)
    model = onnx.load(str(path), load_external_data=False)
    assert model.opset_import[0].version >= 18
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param  # the batch axis is dynamic
    with torch.no_grad():
        for batch in (2, 6):  # CFG-doubled batch sizes, one graph
            sample, t, text, added = unet_inputs(unet, batch, 8, seed=batch)
            expected = unet(sample, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
            got = runner(sample, t, text, added)
            assert got.shape == expected.shape
            assert rel_l2(got, expected) < 1e-4


@needs_ort
def test_onnx_cache_is_keyed_by_weights_and_shape(cache):
    unet = build_preset(get_preset("tiny")).unet.eval()
    first = OnnxRuntimeUNet(unet, weights_hash="test-tiny").prepare(8, 8, 77)[0]
    stamp = first.stat().st_mtime_ns
    again = OnnxRuntimeUNet(unet, weights_hash="test-tiny").prepare(8, 8, 77)[0]
    assert again == first and again.stat().st_mtime_ns == stamp  # reused, not re-exported
    sig = signature_for(unet, 8, 8, torch.float32, 77)
    assert cache_key("a", sig) != cache_key("b", sig)
    assert cache_key("a", sig) != cache_key("a", signature_for(unet, 8, 16, torch.float32, 77))
    assert first.parent.name == cache_key("test-tiny", sig)


@needs_ort
@pytest.mark.timeout(600)
def test_generate_with_onnxruntime_matches_eager(cache, tmp_path, tiny_engine):
    """The whole `daguerre generate --unet-backend onnxruntime` against eager images."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq
    from daguerre.pipeline.schema import ImageRequest, manifest_schema
    from PIL import Image

    rows = [{"id": f"onnx-{i}", "prompt": f"an exported painting {i}", "seed": i, "steps": 4,
             "scheduler": s} for i, s in enumerate(["ddim", "euler", "euler_a", "dpmpp_2m"])]  # fmt: skip
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=manifest_schema()), manifest)
    exe = Path(sys.executable).with_name("daguerre")
    env = {**os.environ, "DAGUERRE_CACHE": str(cache)}
    result = subprocess.run(
        [str(exe), "generate", manifest, "--out", str(tmp_path / "o"), "--unet-backend",
         "onnxruntime", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for row in rows:
        eager = tiny_engine.generate([ImageRequest(**row)])[0].image
        onnx_image = np.asarray(Image.open(tmp_path / "o" / "images" / f"{row['id']}.png"))
        assert np.abs(eager.astype(int) - onnx_image.astype(int)).max() <= 2  # 2/255


# -- TensorRT: everything up to the engine build --------------------------------------------------

SD15_512 = UNetSignature(in_channels=4, latent_height=64, latent_width=64, text_len=77,
                         text_dim=768, pooled_dim=None, time_ids=None, dtype="float16")  # fmt: skip
SDXL_1024 = UNetSignature(in_channels=4, latent_height=128, latent_width=128, text_len=77,
                          text_dim=2048, pooled_dim=1280, time_ids=6, dtype="float16")  # fmt: skip


def test_tensorrt_profiles_cover_the_cfg_doubled_batch_sizes():
    profile = trt_profile(SD15_512, 8)
    assert profile["sample"] == ((2, 4, 64, 64), (16, 4, 64, 64), (16, 4, 64, 64))
    assert profile["encoder_hidden_states"][0] == (2, 77, 768)
    assert profile["timestep"] == ((), (), ())
    assert set(profile) == set(SD15_512.input_names)
    xl = trt_profile(SDXL_1024, 4)
    assert xl["text_embeds"] == ((2, 1280), (8, 1280), (8, 1280))
    assert xl["time_ids"][2] == (8, 6)
    assert set(xl) == set(SDXL_1024.input_names)


def test_tensorrt_engine_key_changes_with_every_input():
    base = trt_engine_key("w", SD15_512, 8, "10.7.0", "sm_90")
    assert base == trt_engine_key("w", SD15_512, 8, "10.7.0", "sm_90")
    for other in (
        trt_engine_key("w2", SD15_512, 8, "10.7.0", "sm_90"),
        trt_engine_key("w", SDXL_1024, 8, "10.7.0", "sm_90"),
        trt_engine_key("w", SD15_512, 16, "10.7.0", "sm_90"),
        trt_engine_key("w", SD15_512, 8, "10.8.0", "sm_90"),
        trt_engine_key("w", SD15_512, 8, "10.7.0", "sm_89"),
    ):
        assert other != base


def test_signatures_of_the_real_architectures():
    sd15 = build_preset(get_preset("sd15"), meta=True).unet
    sdxl = build_preset(get_preset("sdxl"), meta=True).unet
    assert signature_for(sd15, 64, 64, torch.float16, 77) == SD15_512
    assert signature_for(sdxl, 128, 128, torch.float16, 77, 6) == SDXL_1024


def test_tensorrt_backend_says_why_it_cannot_run():
    reason = tensorrt_unavailable()
    if reason is None:
        pytest.skip("tensorrt and CUDA are present: the GPU tests cover the build")
    unet = build_preset(get_preset("tiny")).unet
    with pytest.raises(RuntimeError, match=re.escape(f"unet_backend tensorrt: {reason}")):
        make_runner(unet, "tensorrt", "w")
    with pytest.raises(ValueError, match="unet_backend: 'trt' is not valid"):
        make_runner(unet, "trt", "w")


@pytest.mark.skipif(tensorrt_unavailable() is not None, reason=str(tensorrt_unavailable()))
def test_tensorrt_matches_torch_on_gpu(cache):  # runs only where TensorRT and CUDA exist
    unet = build_preset(get_preset("tiny")).unet.eval().to("cuda", torch.float16)
    runner = make_runner(unet, "tensorrt", "test-tiny", max_batch_size=4)
    sample, t, text, _ = unet_inputs(unet, 4, 8)
    sample, text = sample.to("cuda", torch.float16), text.to("cuda", torch.float16)
    with torch.no_grad():
        expected = unet(sample, t.cuda(), encoder_hidden_states=text).sample
        got = runner(sample, t.cuda(), text)
    assert rel_l2(got.float(), expected.float()) < 1e-2


def test_one_profile_definition_for_build_and_run():
    """`daguerre compile --max-batch-size N` and an engine with max_batch_size N agree."""
    assert trt_profile(SD15_512, 8)["sample"][0][0] == 2  # batch 1, CFG-doubled
    assert trt_profile(SD15_512, 8)["sample"][2][0] == 16  # batch 8, CFG-doubled
    assert batch_buckets(8) == (1, 2, 4, 8) and batch_buckets(6) == (1, 2, 4, 6)
    assert batch_buckets(1) == (1,)


# -- torch.compile ------------------------------------------------------------------------------


def test_torch_compile_pads_to_a_few_buckets():
    """Every batch size 1..8 runs through at most one compiled graph per bucket (4 here),
    and padding never changes the real rows."""
    import torch._dynamo

    unet = build_preset(get_preset("tiny")).unet.eval()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(tuple(example_inputs[0].shape) if example_inputs else ())
        return graph_module.forward

    torch._dynamo.reset()
    runner = TorchCompileUNet(unet, "w", max_batch_size=8)
    runner.compiled = torch.compile(unet, backend=counting_backend, dynamic=False)
    with torch.no_grad():
        for batch in range(1, 9):
            sample, t, text, _ = unet_inputs(unet, 2 * batch, 8, seed=batch)
            got = runner(sample, t, text)
            expected = unet(sample, t, encoder_hidden_states=text).sample
            assert got.shape == expected.shape
            assert rel_l2(got, expected) < 1e-5
    torch._dynamo.reset()
    assert 1 <= len(graphs) <= len(batch_buckets(8)), graphs


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torch_compile_matches_eager():
    unet = build_preset(get_preset("tiny")).unet.eval()
    runner = make_runner(unet, "compile", "w")
    sample, t, text, _ = unet_inputs(unet, 2, 8)
    with torch.no_grad():
        expected = unet(sample, t, encoder_hidden_states=text).sample
        got = runner(sample, t, text)
    assert rel_l2(got, expected) < 1e-4


@needs_ort
@pytest.mark.timeout(600)
def test_cli_compile_prebuilds_into_the_cache(cache, tmp_path):
    exe = Path(sys.executable).with_name("daguerre")
    env = {**os.environ, "DAGUERRE_CACHE": str(cache)}
    args = [str(exe), "compile", "--model", "tiny", "--backend", "onnxruntime",
            "--max-batch-size", "4", "--sizes", "64x64,96x64", "--device", "cpu"]  # fmt: skip
    result = subprocess.run(
        args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=540
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "unet.onnx" in line]
    assert [line.split(":")[0] for line in lines] == [
        "64x64 engine batches 1..4", "96x64 engine batches 1..4",
    ]  # fmt: skip
    for line in lines:
        assert Path(line.split(": ", 1)[1]).is_file()
    # What was built is what an engine with that max_batch_size asks for at run time.
    from daguerre.pipeline.config import EngineConfig
    from daguerre.pipeline.engine import DiffusionEngine

    os.environ["DAGUERRE_CACHE"] = str(cache)
    engine = DiffusionEngine(EngineConfig(model="tiny", device="cpu", unet_backend="onnxruntime",
                                          max_batch_size=4))  # fmt: skip
    assert [str(p) for p in engine.prepare(64, 64)] == [lines[0].split(": ", 1)[1]]
    if tensorrt_unavailable() is not None:
        trt = subprocess.run([*args[:5], "tensorrt"], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert trt.returncode == 2
        assert (
            trt.stderr.strip()
            .splitlines()[-1]
            .startswith("daguerre: error: unet_backend tensorrt:")
        )


def test_bfloat16_is_refused_by_onnxruntime_with_the_way_out():
    from daguerre.kernels.unet import BackendUnavailable

    unet = build_preset(get_preset("tiny")).unet.to(torch.bfloat16)
    with pytest.raises(BackendUnavailable, match="bfloat16 has no ONNX Runtime kernels"):
        make_runner(unet, "onnxruntime", "w")
    assert make_runner(unet, "eager", "w").backend.value == "eager"  # bf16 runs eagerly
