"""The Flux.1 transformer's weights under Black Forest Labs' original names (double_blocks.N.img_attn.qkv...).

A small table, the inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers: each stream's q/k/v
fused into qkv, a single block's q/k/v and MLP input into linear1, the final adaLN halves in (shift, scale) order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ModelError
from .keymap import Entry, unmapped

__all__ = ["flux_entries"]

# diffusers module (below the model) -> original module, outside the blocks
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # swapped halves
}
# diffusers module inside transformer_blocks.N -> original module inside double_blocks.N
_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
# RMS norms: a weight in diffusers, a "scale" in the original
_DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
# diffusers' separate projections -> the original fused tensor, in their order along its rows
_FUSED_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
}
_FUSED_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
}
_KEY = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.(weight|bias)")


def flux_entries(config: Mapping[str, Any], keys: Iterable[str]) -> list[Entry]:
    """Entries (see keymap.Entry) for a FluxTransformer2DModel's state-dict keys: "cat" fuses the projections in
    order, "swap" exchanges the final adaLN projection's halves. Any key the table does not know is a
    ModelError (no weight is dropped)."""
    entries: list[Entry] = []
    fused: dict[str, dict[int, str]] = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        if module in _TOP:
            entries.append(
                Entry(f"{_TOP[module]}.{param}", (key,), "swap" if module == "norm_out.linear" else "")
            )
            continue
        found = _KEY.fullmatch(key)
        if found is None:
            raise unmapped("transformer", key)
        kind, block, inner, param = found.groups()
        double = kind == "transformer_blocks"
        base = f"{'double' if double else 'single'}_blocks.{block}"
        plain, norms, fusing = (
            (_DOUBLE, _DOUBLE_NORMS, _FUSED_DOUBLE) if double else (_SINGLE, _SINGLE_NORMS, _FUSED_SINGLE)
        )
        if inner in plain:
            entries.append(Entry(f"{base}.{plain[inner]}.{param}", (key,)))
        elif inner in norms and param == "weight":
            entries.append(Entry(f"{base}.{norms[inner]}.scale", (key,)))
        elif inner in fusing:
            original, slot = fusing[inner]
            fused.setdefault(f"{base}.{original}.{param}", {})[slot] = key
        else:
            raise unmapped("transformer", key)
    for original, slots in fused.items():
        expected = 4 if original.split(".")[2] == "linear1" else 3
        if sorted(slots) != list(range(expected)):
            raise ModelError(
                f"the transformer lacks a projection fused into {original}; the model is incomplete"
            )
        entries.append(Entry(original, tuple(slots[i] for i in range(expected)), "cat"))
    return entries
