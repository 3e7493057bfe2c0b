"""Step caching for the transformer families (SD3, FLUX): diffusers' TaylorSeer hooks.

`speed: cached` on a transformer runs diffusers' own TaylorSeer cache
(diffusers.hooks.taylorseer_cache) laid out as its lite mode: on a full step every block
runs and the transformer's output projection is kept with its first difference; on the
steps in between no block runs (each returns zeros of its recorded shape, cheaply) and the
output projection is extrapolated, a first-order Taylor step from the last full ones.
Lite mode's own patterns cannot take SD3's last block (it returns None for the text
stream, which the hook cannot record), so the patterns are listed here: such a block's
attention and MLP are skipped instead of the block, leaving only its norms to run.

The schedule is the hook's, fixed: step i is full when i < `warmup` or
(i - warmup - 1) % interval == 0. It depends on the step only, never on the batch, and the
Taylor factors are elementwise per row, so a cached request gives the same image alone and
in any batch of cached requests (the seed contract). diffusers' FirstBlockCache, MagCache
calibration and cache-dit's DBCache decide once per batch from the batch's mean instead.

The hooks live on the transformer only while a cached loop runs (the denoiser's `loop`
removes them when it ends, failed or not), so exact images, FLOP counts and engines that
share the module one after another never pass through them. (Two engines running loops
on one module at the same time would: each engine thread owns its model.)
"""

from __future__ import annotations

from typing import Any

TAYLORSEER_HOOK = "taylorseer_cache"  # the name diffusers registers its hook under
WARMUP_STEPS = 2  # full steps before the first extrapolated one: first order needs two


class TaylorSeerSteps:
    """Turns diffusers' TaylorSeer cache on (fresh state, for one loop) and off on a transformer."""

    def __init__(self, transformer: Any, interval: int, warmup: int = WARMUP_STEPS):
        if interval < 2:
            raise ValueError(f"cache interval {interval}: must be at least 2 (1 caches nothing)")
        self.transformer, self.interval, self.warmup = transformer, interval, warmup
        self.hooks: list[Any] = []  # the TaylorSeer hooks while on

    def is_full(self, step_index: int) -> bool:
        """Whether step `step_index` runs every block (the hook's own rule, stated once here)."""
        i, warmup = step_index, self.warmup
        return i < warmup or (i - warmup - 1) % self.interval == 0

    def on(self) -> None:
        """Hooks on, freshly made (fresh state): a cached loop starts."""
        import torch
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
        from diffusers.hooks.hooks import CacheContext

        self.off()  # whatever a loop that failed, or another engine, left behind
        config = TaylorSeerCacheConfig(
            cache_interval=self.interval, disable_cache_before_step=self.warmup, max_order=1,
            taylor_factors_dtype=torch.float32,  # the factors' storage: no loss on fp32 models
            skip_predict_identifiers=skipped_blocks(self.transformer),
            cache_identifiers=["proj_out"],
        )  # fmt: skip
        apply_taylorseer_cache(self.transformer, config)
        self.hooks = self.installed()
        for hook in self.hooks:
            hook.state_manager.set_context(CacheContext("daguerre"))  # one state per hook

    def off(self) -> None:
        """Hooks removed: the transformer runs exactly as built (no `forward` left on its
        modules' instances either, which would fail a compiled graph's guards)."""
        if self.installed():
            from diffusers.hooks import HookRegistry

            registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
            registry.remove_hook(TAYLORSEER_HOOK, recurse=True)
            registry.invalidate_child_registries_cache()
            for module in self.transformer.modules():  # diffusers put the bound method back
                bound = module.__dict__.get("forward")
                if getattr(bound, "__func__", None) is type(module).forward:
                    del module.__dict__["forward"]
        self.hooks = []

    def installed(self) -> list[Any]:
        """The TaylorSeer hooks on the transformer's modules now (whoever put them there)."""
        registries = (getattr(m, "_diffusers_hook", None) for m in self.transformer.modules())
        hooks = (r.get_hook(TAYLORSEER_HOOK) for r in registries if r is not None)
        return [hook for hook in hooks if hook is not None]


def skipped_blocks(transformer: Any) -> list[str]:
    """Names (exact patterns) of what runs only on full steps: every transformer block, or
    for a block without a text output (SD3's last, context_pre_only) its attention and MLP."""
    import re

    names = []
    for group in ("transformer_blocks", "single_transformer_blocks"):
        for index, block in enumerate(getattr(transformer, group, None) or []):
            name = f"{group}.{index}"
            if not getattr(block, "context_pre_only", False):
                names.append(name)
                continue
            parts = ("attn", "attn2", "ff")
            names += [f"{name}.{part}" for part in parts if getattr(block, part, None) is not None]
    return [re.escape(name) for name in names]
