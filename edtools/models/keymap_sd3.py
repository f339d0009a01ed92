"""The SD3 / SD3.5 MMDiT's weights under their original single-file names (joint_blocks.N.x_block...).

A small table, the inverse of diffusers' convert_sd3_transformer_checkpoint_to_diffusers: q/k/v fused into qkv,
the context-pre-only block's and the final layer's adaLN halves in the original (shift, scale) order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ModelError
from .keymap import Entry, unmapped

__all__ = ["mmdit_entries"]

# diffusers module (below the model) -> original module, outside the blocks
_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # swapped halves
}
# diffusers module inside transformer_blocks.N -> original module inside joint_blocks.N
_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",  # SD3.5's second, image-only attention
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",  # swapped halves in the last block
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
# diffusers' separate projections -> the original fused qkv, in q, k, v order
_QKV = {
    "attn": ("x_block.attn.qkv", ("to_q", "to_k", "to_v")),
    "attn.add": ("context_block.attn.qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
    "attn2": ("x_block.attn2.qkv", ("to_q", "to_k", "to_v")),
}
_FUSED = {
    f"{attn.split('.')[0]}.{name}": (key, slot)
    for attn, (key, names) in _QKV.items()
    for slot, name in enumerate(names)
}
_KEY = re.compile(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)")


def mmdit_entries(config: Mapping[str, Any], keys: Iterable[str]) -> list[Entry]:
    """Entries (see keymap.Entry) for an SD3Transformer2DModel's state-dict keys: "cat" fuses q, k, v;
    "swap" exchanges the two halves of an adaLN projection (diffusers keeps scale, shift; the original shift,
    scale), as diffusers' reader does for the last block's context norm and the final layer. Any key the table
    does not know is a ModelError (no weight is dropped)."""
    last = int(config["num_layers"]) - 1
    entries: list[Entry] = []
    fused: dict[str, list[str | None]] = {}
    for key in keys:
        if key == "pos_embed.pos_embed":
            entries.append(Entry("pos_embed", (key,)))
            continue
        module, _, param = key.rpartition(".")
        if module in _TOP and param in ("weight", "bias"):
            op = "swap" if module == "norm_out.linear" else ""
            entries.append(Entry(f"{_TOP[module]}.{param}", (key,), op))
            continue
        found = _KEY.fullmatch(key)
        if found is None:
            raise unmapped("transformer", key)
        block, inner, param = found.groups()
        base = f"joint_blocks.{block}"
        if inner in _BLOCK:
            swap = inner == "norm1_context.linear" and int(block) == last
            entries.append(Entry(f"{base}.{_BLOCK[inner]}.{param}", (key,), "swap" if swap else ""))
        elif inner in _FUSED:
            original, slot = _FUSED[inner]
            fused.setdefault(f"{base}.{original}.{param}", [None, None, None])[slot] = key
        else:
            raise unmapped("transformer", key)
    for original, slots in fused.items():
        if None in slots:
            raise ModelError(f"the transformer lacks one of q/k/v for {original}; the model is incomplete")
        entries.append(Entry(original, tuple(slots), "cat"))  # type: ignore[arg-type]
    return entries
