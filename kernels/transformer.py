"""How the transformer denoisers (SD3, FLUX) run: eager torch, torch.compile, ONNX Runtime
or TensorRT behind one call, as kernels/compile.py does for the UNet, under the same
backend names (the engine's `unet_backend` names the denoiser's backend for every family).

    runner(inputs) -> noise   inputs: the transformer's keyword arguments as tensors, the
                              batch first in each batched one

What a compiled graph is specialised to is a `TransformerSignature`: every input's shape
but the batch (FLUX's position ids, `txt_ids` and `img_ids`, have no batch). The batch
stays dynamic in the ONNX graph and spans the engine's range in a TensorRT profile;
torch.compile pads each call to a batch bucket, as for the UNet. Timestep and guidance go
to exported graphs in float32 whatever the model's dtype (float16 would round timesteps
near 1000), everything else in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .compile import _pad_batch
from .unet import (
    BackendUnavailable,
    UNetBackend,
    batch_buckets,
    batch_profile,
    cache_key,
    cache_root,
    runnable_backend,
)

UNBATCHED = ("txt_ids", "img_ids")  # FLUX's position ids: one per call, not per row
FLOAT32 = ("timestep", "guidance")  # scalars per row, kept exact in exported graphs
EXPORT_VERSION = 1  # in the cache keys: bump when what export_transformer writes changes


@dataclass(frozen=True)
class TransformerSignature:
    """What an exported transformer graph is specialised to (the batch stays dynamic; the
    weights hash beside it in cache keys names the model)."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # per input: its shape without the batch
    dtype: str

    @property
    def input_names(self) -> list[str]:
        return [name for name, _ in self.shapes]


def signature_of(inputs: dict[str, Any], dtype: Any) -> TransformerSignature:
    """The signature of one call, read off its tensors (inputs that are None are absent)."""
    shapes = tuple(
        (name, tuple(int(d) for d in (t.shape if name in UNBATCHED else t.shape[1:])))
        for name, t in inputs.items()
        if t is not None
    )
    return TransformerSignature(shapes, str(dtype).removeprefix("torch."))


def graph_inputs(inputs: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """The call's tensors as an exported graph takes them: None dropped, sorted by name (so
    a graph built ahead of time and a call's agree whatever order they were made in),
    timestep and guidance in float32, the rest in the model's dtype, each contiguous."""
    import torch

    return {
        name: inputs[name].to(torch.float32 if name in FLOAT32 else dtype).contiguous()
        for name in sorted(inputs)
        if inputs[name] is not None
    }


def trt_transformer_profile(signature: TransformerSignature, max_batch_size: int,
                            rows_per_image: int) -> dict[str, tuple]:  # fmt: skip
    """Optimisation profile per input: (min, opt, max) shapes over the engine's batch range
    (`rows_per_image` 2 with classifier-free guidance: SD3), position ids fixed."""
    low, high = (rows_per_image * b for b in batch_profile(max_batch_size))
    profile = {}
    for name, shape in signature.shapes:
        if name in UNBATCHED:
            profile[name] = (shape, shape, shape)
        else:
            profile[name] = ((low, *shape), (high, *shape), (high, *shape))
    return profile


class TransformerRunner:
    """Runs one transformer eagerly; subclasses change how."""

    backend = UNetBackend.eager

    def __init__(self, transformer: Any, weights_hash: str = "", max_batch_size: int = 1,
                 rows_per_image: int = 1):  # fmt: skip
        self.transformer, self.weights_hash = transformer, weights_hash
        self.max_batch_size, self.rows_per_image = max_batch_size, rows_per_image
        param = next(transformer.parameters())
        self.device, self.dtype = param.device, param.dtype

    def __call__(self, inputs: dict[str, Any]) -> Any:
        return self.transformer(**inputs, return_dict=False)[0]

    def prepare(self, inputs: dict[str, Any]) -> list[Path]:
        """Build (or find in the cache) what calls shaped like `inputs` need; the files."""
        return []


class CompiledTransformer(TransformerRunner):
    """torch.compile with fixed shapes, each call padded to the next batch bucket (rows are
    independent in the transformer, so padding never changes the real ones)."""

    backend = UNetBackend.compile

    def __init__(self, transformer: Any, weights_hash: str = "", max_batch_size: int = 1,
                 rows_per_image: int = 1, mode: str = "auto"):  # fmt: skip
        import torch

        super().__init__(transformer, weights_hash, max_batch_size, rows_per_image)
        self.buckets = tuple(rows_per_image * b for b in batch_buckets(max_batch_size))
        if mode == "auto":  # as the UNet's: autotuning on GPU, the default mode on CPU
            mode = "max-autotune" if self.device.type == "cuda" else "default"
        self.mode = mode
        self.compiled = torch.compile(transformer, mode=None if mode == "default" else mode,
                                      dynamic=False)  # fmt: skip

    def __call__(self, inputs: dict[str, Any]) -> Any:
        rows = inputs["hidden_states"].shape[0]
        bucket = next((b for b in self.buckets if b >= rows), rows)
        padded = {
            name: t if t is None or name in UNBATCHED else _pad_batch(t, bucket)
            for name, t in inputs.items()
        }
        return self.compiled(**padded, return_dict=False)[0][:rows]


class OnnxRuntimeTransformer(TransformerRunner):
    """Exported once per model and signature (dynamo, opset 18, dynamic batch), cached on
    disk by weights hash + signature, run by ONNX Runtime (CUDA provider on a GPU)."""

    backend = UNetBackend.onnxruntime

    def __init__(self, transformer: Any, weights_hash: str = "", max_batch_size: int = 1,
                 rows_per_image: int = 1):  # fmt: skip
        from .onnx import check_onnxruntime

        super().__init__(transformer, weights_hash, max_batch_size, rows_per_image)
        check_onnxruntime(self.device, self.dtype, "the transformer")
        self.sessions: dict[TransformerSignature, Any] = {}

    def prepare(self, inputs: dict[str, Any]) -> list[Path]:
        feeds = graph_inputs(inputs, self.dtype)
        self._session(feeds)
        return [onnx_graph(self.transformer, self.weights_hash, feeds)]

    def _session(self, feeds: dict[str, Any]) -> Any:
        from .onnx import ort_session

        signature = signature_of(feeds, self.dtype)
        if signature not in self.sessions:
            path = onnx_graph(self.transformer, self.weights_hash, feeds)
            self.sessions[signature] = ort_session(path, self.device)
        return self.sessions[signature]

    def __call__(self, inputs: dict[str, Any]) -> Any:
        from .onnx import run_session

        feeds = graph_inputs(inputs, self.dtype)
        return run_session(self._session(feeds), feeds, inputs["hidden_states"], self.device)


class TensorRTTransformer(TransformerRunner):
    """The same ONNX graph built into a TensorRT engine (fp16, one profile over the engine's
    batch range), cached by weights hash + signature + profile + TensorRT version + GPU arch."""

    backend = UNetBackend.tensorrt

    def __init__(self, transformer: Any, weights_hash: str = "", max_batch_size: int = 1,
                 rows_per_image: int = 1):  # fmt: skip
        from .tensorrt import gpu_arch, tensorrt_unavailable

        reason = tensorrt_unavailable()
        if reason:
            raise BackendUnavailable(f"unet_backend tensorrt: {reason}")
        import tensorrt as trt

        super().__init__(transformer, weights_hash, max_batch_size, rows_per_image)
        if str(self.dtype) == "torch.bfloat16":
            raise BackendUnavailable(
                "unet_backend tensorrt: the transformer is in bfloat16 and the engines are "
                "built in fp16; use dtype float16 (or another unet_backend)"
            )
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.arch = gpu_arch(self.device)
        self.engines: dict[TransformerSignature, tuple[Any, Any]] = {}  # engine, context

    def prepare(self, inputs: dict[str, Any]) -> list[Path]:
        feeds = graph_inputs(inputs, self.dtype)
        self._context(feeds)
        return [self.plan_path(signature_of(feeds, self.dtype))[0]]

    def plan_path(self, signature: TransformerSignature) -> tuple[Path, dict[str, tuple]]:
        """The cached plan for `signature` and the profile it is built with."""
        import tensorrt as trt

        profile = trt_transformer_profile(signature, self.max_batch_size, self.rows_per_image)
        key = cache_key(self.weights_hash, signature, tensorrt=trt.__version__, arch=self.arch,
                        export=EXPORT_VERSION,
                        profile={k: [list(s) for s in v] for k, v in profile.items()})  # fmt: skip
        return cache_root() / "tensorrt" / key / "transformer.plan", profile

    def _context(self, feeds: dict[str, Any]) -> Any:
        from .tensorrt import build_plan, load_plan

        signature = signature_of(feeds, self.dtype)
        if signature not in self.engines:
            plan, profile = self.plan_path(signature)
            if not plan.is_file():
                onnx_file = onnx_graph(self.transformer, self.weights_hash, feeds)
                build_plan(onnx_file, plan, profile, self.logger, self.arch)
            self.engines[signature] = load_plan(self.runtime, plan)
        return self.engines[signature][1]

    def __call__(self, inputs: dict[str, Any]) -> Any:
        from .tensorrt import execute

        feeds = graph_inputs(inputs, self.dtype)
        return execute(self._context(feeds), feeds, inputs["hidden_states"], self.device)


def onnx_graph(transformer: Any, weights_hash: str, feeds: dict[str, Any]) -> Path:
    """The cached ONNX graph of `transformer` for calls shaped like `feeds` (exported when
    missing), keyed by weights hash, signature and export version."""
    dtype = next(transformer.parameters()).dtype
    signature = signature_of(feeds, dtype)
    key = cache_key(weights_hash, signature, export=EXPORT_VERSION)
    path = cache_root() / "onnx" / key / "transformer.onnx"
    if not path.is_file():
        export_transformer(transformer, feeds, path)
    return path


def export_transformer(transformer: Any, feeds: dict[str, Any], path: Path) -> Path:
    """Export `transformer` called on `feeds` to ONNX at `path`, the batch dynamic (traced
    on at least 2 rows: the exporter fixes a dimension it sees at size 1)."""
    import torch

    from .onnx import export_graph

    names = list(feeds)
    feeds = {name: t if name in UNBATCHED else _pad_batch(t, 2) for name, t in feeds.items()}

    class Positional(torch.nn.Module):  # the exporter takes positional tensors
        def __init__(self):
            super().__init__()
            self.transformer = transformer

        def forward(self, *tensors):
            return self.transformer(**dict(zip(names, tensors, strict=True)), return_dict=False)[0]

    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic = tuple(None if name in UNBATCHED else {0: batch} for name in names)
    return export_graph(Positional().eval(), list(feeds.values()), names, (dynamic,), path)


RUNNERS: dict[UNetBackend, Any] = {
    UNetBackend.eager: TransformerRunner,
    UNetBackend.onnxruntime: OnnxRuntimeTransformer,
    UNetBackend.tensorrt: TensorRTTransformer,
}


def make_transformer_runner(transformer: Any, backend: str, weights_hash: str,
                            max_batch_size: int = 1, rows_per_image: int = 1,
                            compile_mode: str = "auto") -> TransformerRunner:  # fmt: skip
    """The runner for `backend` (a UNetBackend value other than auto); errors name the
    backend and the reason."""
    kind = runnable_backend(backend)
    if kind is UNetBackend.compile:
        return CompiledTransformer(transformer, weights_hash, max_batch_size, rows_per_image,
                                   mode=compile_mode)  # fmt: skip
    return RUNNERS[kind](transformer, weights_hash, max_batch_size, rows_per_image)
