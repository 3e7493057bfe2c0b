"""How the UNet runs: one interface over eager torch, torch.compile, ONNX Runtime and TensorRT.

    eager        the diffusers module as is
    compile      torch.compile (max-autotune with CUDA graphs on GPU; default mode on CPU),
                 padded to a few batch buckets so it compiles once per bucket
    onnxruntime  kernels/onnx.py: exported once per model and latent shape, cached, run by
                 ONNX Runtime
    tensorrt     kernels/tensorrt.py: the same ONNX built into a TensorRT engine

What every backend shares (names, signatures, batch buckets, cache keys, the runner
interface) is kernels/unet.py; this module holds eager, torch.compile and the registry,
which loads the other two only when asked for. Graphs are specialised to a latent size (a
request bucket), made on first use or ahead of time with `daguerre compile`.
"""

from __future__ import annotations

from typing import Any

from .unet import UNetBackend, UNetRunner, batch_buckets, runnable_backend


class TorchCompileUNet(UNetRunner):
    """torch.compile with fixed shapes: each call is padded to the next batch bucket, so a
    replica forming every batch size from 1 to max compiles once per bucket, not per size."""

    backend = UNetBackend.compile

    def __init__(self, unet: Any, weights_hash: str = "", max_batch_size: int = 1,
                 mode: str = "auto"):  # fmt: skip
        import torch

        super().__init__(unet, weights_hash, max_batch_size)
        self.buckets = tuple(2 * b for b in batch_buckets(max_batch_size))  # CFG-doubled
        cuda = next(unet.parameters()).is_cuda
        # auto: max-autotune on GPU, which includes CUDA graphs recorded once per input shape
        # (batch bucket); on CPU the default mode (autotuning there costs minutes for
        # little). reduce-overhead: CUDA graphs without the minutes of autotuning.
        if mode == "auto":
            mode = "max-autotune" if cuda else "default"
        self.mode = mode
        self.compiled = torch.compile(unet, mode=None if mode == "default" else mode,
                                      dynamic=False)  # fmt: skip

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


def _tensorrt_runner() -> type[UNetRunner]:
    from .tensorrt import TensorRTUNet  # its own module: written against TensorRT 10

    return TensorRTUNet


def _onnxruntime_runner() -> type[UNetRunner]:
    from .onnx import OnnxRuntimeUNet

    return OnnxRuntimeUNet


RUNNERS: dict[UNetBackend, Any] = {
    UNetBackend.eager: lambda: UNetRunner,
    UNetBackend.compile: lambda: TorchCompileUNet,
    UNetBackend.onnxruntime: _onnxruntime_runner,
    UNetBackend.tensorrt: _tensorrt_runner,
}


def make_runner(unet: Any, backend: str, weights_hash: str, max_batch_size: int = 1,
                compile_mode: str = "auto") -> UNetRunner:  # fmt: skip
    """The runner for `backend` (a UNetBackend value); errors name the backend and the reason."""
    kind = runnable_backend(backend)
    if kind is UNetBackend.compile:
        return TorchCompileUNet(unet, weights_hash, max_batch_size, mode=compile_mode)
    return RUNNERS[kind]()(unet, weights_hash, max_batch_size)
