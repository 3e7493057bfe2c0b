"""The attention registry (kernels/attention.py) inside the transformer families.

Two processors compute q, k and v exactly as diffusers' own do (SD3's JointAttnProcessor2_0,
FLUX's FluxAttnProcessor: projections, q/k norms, the text stream joined to the image
stream, FLUX's rotary embedding) and hand the attention itself to an `AttentionDispatch`
(sdpa, xformers, the Triton kernel or auto), [B, H, S, D] as the UNet's processor does. The
real models' head dims are 64 (SD3) and 128 (FLUX), both powers of two the Triton kernel
takes without padding. The engine installs them only when a backend other than sdpa was
asked for; with sdpa diffusers' processors stay (tests check the two agree).
"""

from __future__ import annotations

from typing import Any

from .attention import AttentionDispatch, resolve


class Sd3AttnProcessor:
    """SD3's joint attention: image then text tokens in one sequence (diffusers' order)."""

    def __init__(self, dispatch: AttentionDispatch):
        self.dispatch = dispatch

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        import torch

        batch, image_tokens = hidden_states.shape[:2]
        heads = attn.heads

        def split(x: Any) -> Any:  # [B, S, H*D] -> [B, H, S, D]
            return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        query, key, value = (split(x) for x in _projections(attn, hidden_states, "to"))
        query, key = _norm(attn.norm_q, query), _norm(attn.norm_k, key)
        if encoder_hidden_states is not None:
            text_q, text_k, text_v = (split(x) for x in _projections(attn, encoder_hidden_states,
                                                                     "add"))  # fmt: skip
            text_q, text_k = _norm(attn.norm_added_q, text_q), _norm(attn.norm_added_k, text_k)
            query, key, value = (torch.cat(pair, dim=2) for pair in
                                 ((query, text_q), (key, text_k), (value, text_v)))  # fmt: skip
        out = self.dispatch(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, heads * query.shape[-1]).to(query.dtype)
        image = attn.to_out[1](attn.to_out[0](out[:, :image_tokens]))  # linear, dropout
        if encoder_hidden_states is None:
            return image
        text = out[:, image_tokens:]
        return image, text if attn.context_pre_only else attn.to_add_out(text)


class FluxAttnProcessor:
    """FLUX's attention: text then image tokens (double-stream blocks) or one joined stream
    (single-stream blocks), rotary position embedding on q and k."""

    def __init__(self, dispatch: AttentionDispatch):
        self.dispatch = dispatch

    def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, image_rotary_emb: Any = None) -> Any:  # fmt: skip
        import torch
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, text_q, text_k, text_v = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        heads = lambda x: x.unflatten(-1, (-1, attn.head_dim))  # noqa: E731  [B, S, H, D]
        query, key, value = attn.norm_q(heads(query)), attn.norm_k(heads(key)), heads(value)
        if attn.added_kv_proj_dim is not None:
            text_q, text_k = attn.norm_added_q(heads(text_q)), attn.norm_added_k(heads(text_k))
            query, key, value = (torch.cat(pair, dim=1) for pair in
                                 ((text_q, query), (text_k, key), (heads(text_v), value)))  # fmt: skip
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if attention_mask is not None:  # FLUX.1 passes none; diffusers' path handles one
            out = torch.nn.functional.scaled_dot_product_attention(
                *(x.transpose(1, 2) for x in (query, key, value)), attn_mask=attention_mask
            )  # fmt: skip
        else:
            out = self.dispatch(*(x.transpose(1, 2) for x in (query, key, value)))
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)  # [B, S, H*D]
        if encoder_hidden_states is None:
            return out
        text_len = encoder_hidden_states.shape[1]
        text, image = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


def _projections(attn: Any, states: Any, stream: str) -> tuple[Any, Any, Any]:
    """q, k, v of the image stream (`to`) or the text stream (`add`), fused or not."""
    if stream == "to":
        fused = getattr(attn, "to_qkv", None)
        separate = (attn.to_q, attn.to_k, attn.to_v)
    else:
        fused = getattr(attn, "to_added_qkv", None)
        separate = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
    if fused is not None and getattr(attn, "fused_projections", False):
        return fused(states).chunk(3, dim=-1)
    return tuple(projection(states) for projection in separate)


def _norm(norm: Any, x: Any) -> Any:
    return x if norm is None else norm(x)


def install_dit_attention(transformer: Any, family: str, requested: str | None,
                          device_type: str) -> AttentionDispatch:  # fmt: skip
    """Make every attention layer of an SD3 or FLUX transformer run through the chosen
    backend; return the dispatch."""
    dispatch = AttentionDispatch(resolve(requested, device_type), device_type)
    processor = (Sd3AttnProcessor if family == "sd3" else FluxAttnProcessor)(dispatch)
    transformer.set_attn_processor(processor)
    return dispatch
