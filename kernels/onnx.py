"""The ONNX Runtime UNet backend: exported once per model and latent shape (dynamo exporter,
opset 18, dynamic batch), cached on disk by weights hash + shapes, run by ONNX Runtime (the
CUDA execution provider with I/O binding on GPU, the CPU one otherwise)."""

from __future__ import annotations

import logging
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

from .unet import (
    ONNX_OPSET,
    BackendUnavailable,
    UNetBackend,
    UNetRunner,
    UNetSignature,
    cache_key,
    cache_root,
    call_signature,
    signature_for,
)


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
    return export_graph(_export_module(unet, sdxl), inputs, signature.input_names, dynamic, path)


def export_graph(module: Any, inputs: list[Any], input_names: list[str], dynamic: Any,
                 path: Path) -> Path:  # fmt: skip
    """Export `module` called on `inputs` (named `input_names`, dims as `dynamic` says) to
    ONNX at `path` with one output, `noise`; atomically (another process may race us)."""
    import torch

    tmp = path.parent.with_name(f".{path.parent.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    try:
        # quiet: the exporter's progress lines and its own deprecation notes are not the
        # user's to act on (a failed export still raises)
        registration = logging.getLogger("torch.onnx._internal.exporter._registration")
        registration.setLevel(logging.ERROR)  # "torchvision is not installed": nor needed
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", (FutureWarning, UserWarning))
            program = torch.onnx.export(
                module, tuple(inputs), dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                input_names=input_names, output_names=["noise"], dynamic_shapes=dynamic,
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
        check_onnxruntime(self.device, self.dtype, "the UNet")
        self.sessions: dict[UNetSignature, Any] = {}

    def prepare(self, latent_height, latent_width, text_len, time_ids=None) -> list[Path]:
        signature = signature_for(
            self.unet, latent_height, latent_width, self.dtype, text_len, time_ids
        )
        self._session(signature)
        return [onnx_path(self.unet, self.weights_hash, signature)]

    def _session(self, signature: UNetSignature) -> Any:
        if signature not in self.sessions:
            path = onnx_path(self.unet, self.weights_hash, signature)
            self.sessions[signature] = ort_session(path, self.device)
        return self.sessions[signature]

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        signature = call_signature(
            self.unet, sample, encoder_hidden_states, added_cond_kwargs, self.dtype
        )
        inputs = [sample, timestep.float().reshape(()), encoder_hidden_states]
        if signature.pooled_dim is not None:
            inputs += [added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]]
        feeds = dict(zip(signature.input_names, inputs, strict=True))
        return run_session(self._session(signature), feeds, sample, self.device)


def check_onnxruntime(device: Any, dtype: Any, what: str) -> None:
    """Raise BackendUnavailable when ONNX Runtime cannot run `what` on this device and dtype."""
    if str(dtype) == "torch.bfloat16":
        raise BackendUnavailable(
            f"unet_backend onnxruntime: bfloat16 has no ONNX Runtime kernels for {what}; "
            "use dtype float16 or float32 (or another unet_backend)"
        )
    if device.type == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(
                "unet_backend onnxruntime: this onnxruntime has no CUDAExecutionProvider "
                f"(install onnxruntime-gpu), so it cannot run {what} on CUDA"
            )


def ort_session(path: Path, device: Any) -> Any:
    """An ONNX Runtime session over `path`: the CUDA provider on a CUDA device, else the CPU's."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda":
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    return ort.InferenceSession(str(path), options, providers=providers)


def run_session(session: Any, feeds: dict[str, Any], like: Any, device: Any) -> Any:
    """The session's `noise` for torch tensors `feeds`, shaped like the tensor `like` (on
    the GPU bound in place, no copies through the host)."""
    import torch

    if device.type != "cuda":
        numpy_feeds = {name: t.detach().cpu().numpy() for name, t in feeds.items()}
        return torch.from_numpy(session.run(["noise"], numpy_feeds)[0])
    binding = session.io_binding()
    for name, tensor in feeds.items():
        tensor = tensor.contiguous()
        binding.bind_input(name, "cuda", device.index or 0, _np_dtype(tensor.dtype),
                           tuple(tensor.shape), tensor.data_ptr())  # fmt: skip
    out = torch.empty_like(like)
    binding.bind_output("noise", "cuda", device.index or 0, _np_dtype(out.dtype),
                        tuple(out.shape), out.data_ptr())  # fmt: skip
    session.run_with_iobinding(binding)
    return out


def _np_dtype(dtype: Any) -> Any:
    import numpy as np
    import torch

    return {torch.float16: np.float16, torch.float32: np.float32}[dtype]
