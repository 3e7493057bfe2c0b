"""How the UNet runs: one interface over eager torch, torch.compile, ONNX Runtime and TensorRT.

    eager        the diffusers module as is (this file, as are compile and onnxruntime)
    compile      torch.compile (max-autotune with CUDA graphs on GPU; default mode on CPU)
    onnxruntime  exported once per model and latent shape (dynamo exporter, opset 18, dynamic
                 batch), cached on disk by weights hash + shapes, run by ONNX Runtime (CUDA
                 execution provider on GPU, CPU otherwise)
    tensorrt     (kernels/tensorrt.py) the same ONNX built into a TensorRT engine: fp16, one optimisation profile
                 over the configured batch sizes (x2 for classifier-free guidance), a timing
                 cache, engines cached by weights hash + shapes + profile + TensorRT version +
                 GPU arch. Lifecycle as in TensorRT's demo: export -> build -> load ->
                 allocate -> infer.

Every runner is called like the engine calls the UNet and returns the noise prediction:
`runner(sample, timestep, encoder_hidden_states, added_cond_kwargs) -> Tensor`. Graphs are
specialised to a latent size (a request bucket), made on first use or ahead of time with
`daguerre compile`. The batch sizes a runner must take follow from the engine's
`max_batch_size` alone (`batch_buckets`, `batch_profile`), so a graph built ahead of time
is the one the engine asks for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

ONNX_OPSET = 18  # opset 17 from the dynamo exporter gives graphs onnxruntime rejects


class BackendUnavailable(RuntimeError):
    """A UNet backend that cannot run in this process; the message says why."""


class UNetBackend(str, Enum):
    eager = "eager"
    compile = "compile"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


UNET_BACKENDS = tuple(b.value for b in UNetBackend)


@dataclass(frozen=True)
class UNetSignature:
    """What an exported graph is specialised to (batch stays dynamic)."""

    in_channels: int
    latent_height: int
    latent_width: int
    text_len: int
    text_dim: int
    pooled_dim: int | None  # SDXL: pooled text embedding width
    time_ids: int | None  # SDXL: micro-conditioning values
    dtype: str

    @property
    def input_names(self) -> list[str]:
        names = ["sample", "timestep", "encoder_hidden_states"]
        return names + (["text_embeds", "time_ids"] if self.pooled_dim else [])


def signature_for(
    unet: Any, latent_height: int, latent_width: int, dtype: Any, text_len: int,
    time_ids: int | None = None,
) -> UNetSignature:  # fmt: skip
    """The signature of `unet` at one latent size, for `text_len` tokens (and, for SDXL-style
    text+time conditioning, `time_ids` micro-conditioning values)."""
    config = unet.config
    pooled = None
    if config.get("addition_embed_type") == "text_time":
        pooled = (
            config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
        )
    return UNetSignature(
        in_channels=config.in_channels,
        latent_height=latent_height,
        latent_width=latent_width,
        text_len=text_len,
        text_dim=config.cross_attention_dim,
        pooled_dim=pooled,
        time_ids=time_ids if pooled is not None else None,
        dtype=str(dtype).removeprefix("torch."),
    )


def call_signature(unet: Any, sample: Any, encoder_hidden_states: Any, added: dict | None,
                   dtype: Any) -> UNetSignature:  # fmt: skip
    """The signature of one call, read off its tensors."""
    time_ids = added["time_ids"].shape[1] if added else None
    return signature_for(unet, sample.shape[2], sample.shape[3], dtype,
                         encoder_hidden_states.shape[1], time_ids)  # fmt: skip


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Engine batch sizes a fixed-shape backend is built for: powers of two, then the max.
    A batch runs padded to the next bucket (x2 in the UNet for classifier-free guidance)."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return (*buckets, max_batch_size)


def batch_profile(max_batch_size: int) -> tuple[int, int]:
    """(smallest, largest) engine batch a dynamic-shape engine (TensorRT profile) must take."""
    return 1, max_batch_size


def cache_key(weights_hash: str, signature: UNetSignature, **extra: Any) -> str:
    """A digest naming one compiled artefact: the same inputs always give the same key."""
    import torch

    fields = {"weights": weights_hash, "signature": asdict(signature), "torch": torch.__version__,
              "opset": ONNX_OPSET, **extra}  # fmt: skip
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def cache_root() -> Path:
    """$DAGUERRE_CACHE (default ~/.cache/daguerre): compiled artefacts live under it."""
    return Path(os.environ.get("DAGUERRE_CACHE") or Path.home() / ".cache" / "daguerre")


# -- runners ---------------------------------------------------------------------------------


class UNetRunner:
    """Runs one UNet; subclasses change how."""

    backend = UNetBackend.eager

    def __init__(self, unet: Any, weights_hash: str = "", max_batch_size: int = 1):
        self.unet = unet
        self.weights_hash = weights_hash
        self.max_batch_size = max_batch_size

    def __call__(self, sample: Any, timestep: Any, encoder_hidden_states: Any,
                 added_cond_kwargs: dict | None = None) -> Any:  # fmt: skip
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
        ).sample  # fmt: skip

    def prepare(self, latent_height: int, latent_width: int, text_len: int,
                time_ids: int | None = None) -> list[Path]:  # fmt: skip
        """Build (or find in the cache) what this latent size needs; return the files."""
        return []


class TorchCompileUNet(UNetRunner):
    """torch.compile with fixed shapes: each call is padded to the next batch bucket, so a
    replica forming every batch size from 1 to max compiles once per bucket, not per size."""

    backend = UNetBackend.compile

    def __init__(self, unet: Any, weights_hash: str = "", max_batch_size: int = 1):
        import torch

        super().__init__(unet, weights_hash, max_batch_size)
        self.buckets = tuple(2 * b for b in batch_buckets(max_batch_size))  # CFG-doubled
        cuda = next(unet.parameters()).is_cuda
        # max-autotune on GPU includes CUDA graphs, recorded once per input shape (batch
        # bucket); on CPU the default mode (autotuning there costs minutes for little).
        self.compiled = torch.compile(unet, mode="max-autotune" if cuda else None, dynamic=False)

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        batch = sample.shape[0]
        bucket = next((b for b in self.buckets if b >= batch), batch)
        pad = lambda t: _pad_batch(t, bucket)  # noqa: E731
        added = {k: pad(v) for k, v in added_cond_kwargs.items()} if added_cond_kwargs else None
        noise = self.compiled(
            pad(sample), timestep, encoder_hidden_states=pad(encoder_hidden_states),
            added_cond_kwargs=added,
        ).sample  # fmt: skip
        return noise[:batch]


def _pad_batch(tensor: Any, size: int) -> Any:
    """`tensor` with its batch dim grown to `size` by repeating its last row (rows are
    independent in the UNet, so padding never changes the real ones)."""
    import torch

    missing = size - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


def _export_module(unet: Any, sdxl: bool) -> Any:
    """A plain-tensor forward for export: (sample, timestep, text[, pooled, time_ids]) -> noise."""
    import torch

    class SD(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample

    class SDXL(SD):
        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.unet(
                sample, timestep, encoder_hidden_states=encoder_hidden_states,
                added_cond_kwargs=added,
            ).sample  # fmt: skip

    return (SDXL if sdxl else SD)().eval()


def export_onnx(unet: Any, signature: UNetSignature, path: Path) -> Path:
    """Export `unet` at `signature` to ONNX (dynamic batch) at `path`, atomically."""
    import torch

    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    sdxl = signature.pooled_dim is not None
    b = 2
    inputs = [
        torch.randn(b, signature.in_channels, signature.latent_height, signature.latent_width,
                    device=device, dtype=dtype),
        torch.tensor(999.0, device=device),
        torch.randn(b, signature.text_len, signature.text_dim, device=device, dtype=dtype),
    ]  # fmt: skip
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic: dict[str, Any] = {"sample": {0: batch}, "timestep": None,
                               "encoder_hidden_states": {0: batch}}  # fmt: skip
    if sdxl:
        inputs += [torch.randn(b, signature.pooled_dim, device=device, dtype=dtype),
                   torch.randn(b, signature.time_ids, device=device, dtype=dtype)]  # fmt: skip
        dynamic.update(text_embeds={0: batch}, time_ids={0: batch})
    tmp = path.parent.with_name(f".{path.parent.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                _export_module(unet, sdxl), tuple(inputs), dynamo=True, opset_version=ONNX_OPSET,
                input_names=signature.input_names, output_names=["noise"],
                dynamic_shapes=dynamic,
            )  # fmt: skip
        program.save(str(tmp / path.name), external_data=True)  # > 2 GB models need it
        path.parent.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(path.parent)
        except OSError:  # another process exported the same graph first
            if not path.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def onnx_path(unet: Any, weights_hash: str, signature: UNetSignature) -> Path:
    """The cached ONNX file for this model and signature (exported when missing)."""
    path = cache_root() / "onnx" / cache_key(weights_hash, signature) / "unet.onnx"
    if not path.is_file():
        export_onnx(unet, signature, path)
    return path


class OnnxRuntimeUNet(UNetRunner):
    backend = UNetBackend.onnxruntime

    def __init__(self, unet: Any, weights_hash: str = "", max_batch_size: int = 1):
        super().__init__(unet, weights_hash, max_batch_size)
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        if str(self.dtype) == "torch.bfloat16":
            raise BackendUnavailable(
                "unet_backend onnxruntime: bfloat16 has no ONNX Runtime kernels for the UNet; "
                "use dtype float16 or float32 (or another unet_backend)"
            )
        self.sessions: dict[UNetSignature, Any] = {}

    def prepare(self, latent_height, latent_width, text_len, time_ids=None) -> list[Path]:
        signature = signature_for(
            self.unet, latent_height, latent_width, self.dtype, text_len, time_ids
        )
        self._session(signature)
        return [onnx_path(self.unet, self.weights_hash, signature)]

    def _session(self, signature: UNetSignature) -> Any:
        if signature not in self.sessions:
            import onnxruntime as ort
            import torch

            path = onnx_path(self.unet, self.weights_hash, signature)
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = torch.get_num_threads()
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda":
                providers.insert(
                    0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0})
                )
            self.sessions[signature] = ort.InferenceSession(str(path), options, providers=providers)
        return self.sessions[signature]

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        import torch

        signature = call_signature(
            self.unet, sample, encoder_hidden_states, added_cond_kwargs, self.dtype
        )
        session = self._session(signature)
        inputs = [sample, timestep.float().reshape(()), encoder_hidden_states]
        if signature.pooled_dim is not None:
            inputs += [added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]]
        if self.device.type != "cuda":
            feeds = {
                n: t.detach().cpu().numpy()
                for n, t in zip(signature.input_names, inputs, strict=True)
            }
            return torch.from_numpy(session.run(["noise"], feeds)[0])
        # On the GPU: bind torch's buffers directly, no copies through the host.
        binding = session.io_binding()
        for name, tensor in zip(signature.input_names, inputs, strict=True):
            tensor = tensor.contiguous()
            binding.bind_input(name, "cuda", self.device.index or 0, _np_dtype(tensor.dtype),
                               tuple(tensor.shape), tensor.data_ptr())  # fmt: skip
        out = torch.empty_like(sample)
        binding.bind_output("noise", "cuda", self.device.index or 0, _np_dtype(out.dtype),
                            tuple(out.shape), out.data_ptr())  # fmt: skip
        session.run_with_iobinding(binding)
        return out


def _np_dtype(dtype: Any) -> Any:
    import numpy as np
    import torch

    return {torch.float16: np.float16, torch.float32: np.float32}[dtype]


def _tensorrt_runner() -> type[UNetRunner]:
    from .tensorrt import TensorRTUNet  # its own module: written against TensorRT 10

    return TensorRTUNet


RUNNERS: dict[UNetBackend, Any] = {
    UNetBackend.eager: lambda: UNetRunner,
    UNetBackend.compile: lambda: TorchCompileUNet,
    UNetBackend.onnxruntime: lambda: OnnxRuntimeUNet,
    UNetBackend.tensorrt: _tensorrt_runner,
}


def make_runner(unet: Any, backend: str, weights_hash: str, max_batch_size: int = 1) -> UNetRunner:
    """The runner for `backend` (a UNetBackend value); errors name the backend and the reason."""
    try:
        kind = UNetBackend(backend)
    except ValueError:
        raise ValueError(
            f"unet_backend: {backend!r} is not valid; use one of {', '.join(UNET_BACKENDS)}"
        ) from None
    if kind is UNetBackend.onnxruntime and importlib.util.find_spec("onnxruntime") is None:
        raise RuntimeError(
            "unet_backend onnxruntime: install the onnx extra (pip install 'daguerre[onnx]')"
        )
    return RUNNERS[kind]()(unet, weights_hash, max_batch_size)
