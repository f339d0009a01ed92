"""Flux's original (Black Forest Labs) key layout for tests: a port of the key map ComfyUI applies to Flux models
(comfy/utils.py flux_to_diffusers, as comfy/lora.py uses it for "transformer." LoRA keys), and a writer of it.

Each diffusers transformer weight maps to an original key, or to a row slice (offset, size) of a fused one:
the image and text attention's q/k/v are one `qkv`, a single block's q/k/v and MLP input are one `linear1`.
"""

from __future__ import annotations

import torch

# diffusers name inside a double-stream block -> original name (ComfyUI's block map, LoRA-relevant and norms)
_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
_BASIC = {
    "proj_out": "final_layer.linear",
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}


def key_map(config) -> dict[str, tuple[str, int | None, int | None]]:
    """diffusers weight key -> (original key, row offset, rows) (offset None: the whole tensor), for a
    FluxTransformer2DModel config. The norm_out modulation (scale and shift swapped) maps with offset -1."""
    hidden = config.num_attention_heads * config.attention_head_dim
    out: dict[str, tuple[str, int | None, int | None]] = {}
    for i in range(config.num_layers):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for end in ("weight", "bias"):
            for n, (q, k, v) in enumerate(
                [("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")]
            ):
                fused = f"{dst}.{'img' if n == 0 else 'txt'}_attn.qkv.{end}"
                for j, name in enumerate((q, k, v)):
                    out[f"{src}.attn.{name}.{end}"] = (fused, j * hidden, hidden)
            for ours, theirs in _DOUBLE.items():
                out[f"{src}.{ours}.{end}"] = (f"{dst}.{theirs}.{end}", None, None)
        for ours, theirs in _DOUBLE_NORMS.items():
            out[f"{src}.{ours}"] = (f"{dst}.{theirs}", None, None)
    mlp = int(hidden * 4)  # mlp_ratio 4
    for i in range(config.num_single_layers):
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for end in ("weight", "bias"):
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                out[f"{src}.attn.{name}.{end}"] = (f"{dst}.linear1.{end}", j * hidden, hidden)
            out[f"{src}.proj_mlp.{end}"] = (f"{dst}.linear1.{end}", 3 * hidden, mlp)
            for ours, theirs in _SINGLE.items():
                out[f"{src}.{ours}.{end}"] = (f"{dst}.{theirs}.{end}", None, None)
        for ours, theirs in _SINGLE_NORMS.items():
            out[f"{src}.{ours}"] = (f"{dst}.{theirs}", None, None)
    for end in ("weight", "bias"):
        for ours, theirs in _BASIC.items():
            out[f"{ours}.{end}"] = (f"{theirs}.{end}", None, None)
        out[f"norm_out.linear.{end}"] = (f"final_layer.adaLN_modulation.1.{end}", -1, None)
    return out


def original_state_dict(transformer, prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel's weights in the original layout (fused tensors concatenated in row
    order), every key under `prefix` ("model.diffusion_model." in ComfyUI's checkpoints, "" in BFL's files)."""
    state = transformer.state_dict()
    mapping = key_map(transformer.config)
    missing = sorted(set(state) - set(mapping))
    assert not missing, f"weights the map lacks: {missing[:5]}"
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key, offset, _ = mapping[name]
        if offset is None:
            out[prefix + key] = tensor.clone()
        elif (
            offset == -1
        ):  # diffusers' AdaLayerNormContinuous is (scale, shift); the original is (shift, scale)
            scale, shift = tensor.chunk(2, dim=0)
            out[prefix + key] = torch.cat([shift, scale], dim=0)
        else:
            parts.setdefault(key, []).append((offset, tensor))
    for key, pieces in parts.items():
        out[prefix + key] = torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])], dim=0)
    return out
