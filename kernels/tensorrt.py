"""The TensorRT UNet backend: ONNX -> TensorRT engine (fp16, one optimisation profile over
the engine's batch range, x2 for classifier-free guidance, a timing cache) -> execution
context per latent size. Engines are cached by weights hash + shapes + profile + TensorRT
version + GPU arch. Lifecycle as in TensorRT's demo: export -> build -> load -> allocate ->
infer. Written against the TensorRT 10 Python API; TensorRT cannot be installed in this
workplace, so everything up to the engine build is tested (profiles, keys, signatures).
"""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path
from typing import Any

from .onnx import onnx_path
from .unet import (
    BackendUnavailable,
    UNetBackend,
    UNetRunner,
    UNetSignature,
    batch_profile,
    cache_key,
    cache_root,
    call_signature,
    signature_for,
)


def trt_profile(signature: UNetSignature, max_batch_size: int) -> dict[str, tuple]:
    """Optimisation profile per input: (min, opt, max) shapes, batch doubled for CFG."""
    low, high = (2 * b for b in batch_profile(max_batch_size))
    h, w = signature.latent_height, signature.latent_width

    def shapes(*rest: int) -> tuple:
        return ((low, *rest), (high, *rest), (high, *rest))

    profile = {
        "sample": shapes(signature.in_channels, h, w),
        "timestep": ((), (), ()),
        "encoder_hidden_states": shapes(signature.text_len, signature.text_dim),
    }
    if signature.pooled_dim is not None:
        profile["text_embeds"] = shapes(signature.pooled_dim)
        profile["time_ids"] = shapes(signature.time_ids)
    return profile


def trt_engine_key(weights_hash: str, signature: UNetSignature, max_batch_size: int,
                   trt_version: str, gpu_arch: str) -> str:  # fmt: skip
    """The cache key of a TensorRT engine: model, shapes, profile, TensorRT version, GPU arch."""
    profile = {k: [list(s) for s in v] for k, v in trt_profile(signature, max_batch_size).items()}
    return cache_key(weights_hash, signature, profile=profile, tensorrt=trt_version, arch=gpu_arch)


class TensorRTUNet(UNetRunner):
    """ONNX -> TensorRT engine (fp16, one profile) -> execution context per latent size."""

    backend = UNetBackend.tensorrt

    def __init__(self, unet: Any, weights_hash: str = "", max_batch_size: int = 1):
        reason = tensorrt_unavailable()
        if reason:
            raise BackendUnavailable(f"unet_backend tensorrt: {reason}")
        import tensorrt as trt

        super().__init__(unet, weights_hash, max_batch_size)
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.arch = gpu_arch(self.device)
        self.engines: dict[UNetSignature, tuple[Any, Any]] = {}  # engine, context

    def engine_path(self, signature: UNetSignature) -> Path:
        import tensorrt as trt

        key = trt_engine_key(
            self.weights_hash, signature, self.max_batch_size, trt.__version__, self.arch
        )
        return cache_root() / "tensorrt" / key / "unet.plan"

    def prepare(self, latent_height, latent_width, text_len, time_ids=None) -> list[Path]:
        signature = signature_for(
            self.unet, latent_height, latent_width, self.dtype, text_len, time_ids
        )
        self._context(signature)
        return [self.engine_path(signature)]

    def _context(self, signature: UNetSignature) -> tuple[Any, Any]:
        if signature not in self.engines:
            plan = self.engine_path(signature)
            if not plan.is_file():
                onnx_file = onnx_path(self.unet, self.weights_hash, signature)
                build_plan(onnx_file, plan, trt_profile(signature, self.max_batch_size),
                           self.logger, self.arch)  # fmt: skip
            self.engines[signature] = load_plan(self.runtime, plan)
        return self.engines[signature]

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        signature = call_signature(
            self.unet, sample, encoder_hidden_states, added_cond_kwargs, self.dtype
        )
        _, context = self._context(signature)
        inputs = [sample, timestep.float().reshape(()), encoder_hidden_states]
        if signature.pooled_dim is not None:
            inputs += [added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]]
        feeds = dict(zip(signature.input_names, inputs, strict=True))
        return execute(context, feeds, sample, self.device)


# -- the lifecycle every TensorRT denoiser shares: build -> load -> execute --------------------


def gpu_arch(device: Any) -> str:
    """sm_XY of `device` (engines are built per architecture)."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def build_plan(onnx_file: Path, plan: Path, profile: dict[str, tuple], logger: Any,
               arch: str) -> None:  # fmt: skip
    """Build an fp16 engine from `onnx_file` into `plan` with one optimisation `profile`
    ({input: (min, opt, max) shapes}) and the architecture's shared timing cache."""
    import tensorrt as trt

    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    timing_file = cache_root() / "tensorrt" / f"timing-{arch}.cache"
    timing = config.create_timing_cache(timing_file.read_bytes() if timing_file.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    optimisation = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimisation.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimisation)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_file}")
    plan.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.with_name(f".{plan.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(plan)
    timing_file.write_bytes(bytes(config.get_timing_cache().serialize()))


def load_plan(runtime: Any, plan: Path) -> tuple[Any, Any]:
    """(engine, execution context) of a built plan."""
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    return engine, engine.create_execution_context()


def execute(context: Any, feeds: dict[str, Any], like: Any, device: Any) -> Any:
    """Run `context` on torch tensors `feeds` on the current stream; `noise`, shaped like `like`."""
    import torch

    feeds = {name: t.contiguous() for name, t in feeds.items()}  # alive until the stream is done
    for name, tensor in feeds.items():
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    out = torch.empty_like(like)
    context.set_tensor_address("noise", out.data_ptr())
    stream = torch.cuda.current_stream(device)
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    return out


def tensorrt_unavailable() -> str | None:
    """Why the TensorRT backend cannot run here (None when it can)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'daguerre[gpu]' on a CUDA machine)"
    import torch

    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU"
    return None
