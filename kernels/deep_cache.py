"""Step caching (the DeepCache method) for diffusers' UNet2DConditionModel.

Neighbouring denoising steps change the UNet's deep features little. So on a "full" step
the whole UNet runs and the features entering its last up block are kept; on the steps
in between only the shallow branch runs (time embedding, conv_in, the first down block,
then the last up block on the kept features, and the output convolution), which skips
most of the UNet's FLOPs.

The schedule is fixed: step i is full when i % interval == 0. It depends on the step only,
never on the batch, and every row of the kept features belongs to its own image, so a
cached request gives the same image alone and in any batch of cached requests (the seed
contract). diffusers' FirstBlockCache instead decides once per batch from the batch's
mean, which would make an image depend on its batch-mates.

The shallow branch calls the UNet's own submodules and embedding helpers in the order of
UNet2DConditionModel.forward; a test checks that a shallow step over features kept at the
same step equals the full forward.
"""

from __future__ import annotations

from typing import Any


class DeepCacheUNet:
    """Runs an eager diffusers UNet with step caching for one denoising loop at a time."""

    def __init__(self, unet: Any, interval: int):
        if interval < 2:
            raise ValueError(f"cache interval {interval}: must be at least 2 (1 caches nothing)")
        self.unet, self.interval = unet, interval
        self.kept: Any = None  # features entering the last up block at the last full step
        self.full_steps = 0
        self.cached_steps = 0
        unet.up_blocks[-1].register_forward_pre_hook(self._keep, with_kwargs=True)
        self._keeping = False

    def is_full(self, step_index: int) -> bool:
        return step_index % self.interval == 0 or self.kept is None

    def __call__(self, step_index: int, sample: Any, timestep: Any, encoder_hidden_states: Any,
                 added_cond_kwargs: dict | None = None) -> Any:  # fmt: skip
        """The UNet's noise prediction at this step: full, or the shallow branch."""
        if self.is_full(step_index):
            self.full_steps += 1
            self._keeping = True
            try:
                return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]  # fmt: skip
            finally:
                self._keeping = False
        self.cached_steps += 1
        return self.shallow(sample, timestep, encoder_hidden_states, added_cond_kwargs)

    def reset(self) -> None:
        """Forget the kept features (a new denoising loop starts)."""
        self.kept = None

    def _keep(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self._keeping:
            self.kept = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def shallow(self, sample: Any, timestep: Any, encoder_hidden_states: Any,
                added_cond_kwargs: dict | None) -> Any:  # fmt: skip
        """conv_in, the first down block, the last up block on the kept features, conv_out."""
        unet = self.unet
        emb = self._embedding(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        hidden = unet.conv_in(sample)
        first = unet.down_blocks[0]
        if getattr(first, "has_cross_attention", False):
            _, down_res = first(hidden_states=hidden, temb=emb,
                                encoder_hidden_states=encoder_hidden_states)  # fmt: skip
        else:
            _, down_res = first(hidden_states=hidden, temb=emb)
        last = unet.up_blocks[-1]
        res = ((hidden,) + tuple(down_res))[: len(last.resnets)]
        if getattr(last, "has_cross_attention", False):
            out = last(hidden_states=self.kept, temb=emb, res_hidden_states_tuple=res,
                       encoder_hidden_states=encoder_hidden_states)  # fmt: skip
        else:
            out = last(hidden_states=self.kept, temb=emb, res_hidden_states_tuple=res)
        if unet.conv_norm_out is not None:
            out = unet.conv_act(unet.conv_norm_out(out))
        return unet.conv_out(out)

    def _embedding(self, sample: Any, timestep: Any, encoder_hidden_states: Any,
                   added_cond_kwargs: dict | None) -> Any:  # fmt: skip
        """The time (and SDXL's added) embedding, as UNet2DConditionModel.forward makes it."""
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs or {})  # fmt: skip
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        return emb
