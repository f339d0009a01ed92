"""Real-size SD3.5 Medium and Flux.1 dev diffusers folders with random weights, written tensor by tensor; Flux also
as a single file in the ComfyUI checkpoint layout, streamed from the folder, and SD3.5 as ComfyUI's file with its
T5-XXL in scaled float8 (sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors).

A Flux transformer is 22 GiB in bf16, more than this machine can hold beside its build, so no part is ever built
whole: each part is made on the meta device (bench/memory_flow.py's real configs), and its tensors are filled one at
a time and written into safetensors shards with the index diffusers and transformers read. The folder around them
(tokenizers, scheduler, model_index.json) is `edtools make-tiny-model`'s, so the family is recognised as a user's.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path

from memory_flow import CLIP_G, CLIP_L, FLOW_VAE, FLUX_DEV_TRANSFORMER, SD35M_TRANSFORMER, T5_XXL

__all__ = [
    "FLOW_FOLDERS",
    "build_flow_folder",
    "stream_safetensors",
    "write_flux_single_file",
    "write_scaled_fp8",
]

GIB = 2**30
SHARD_BYTES = 2 * GIB  # shards of at most this size, as the hub's are (diffusers 5-10 GB, transformers 5 GB)

# per family: (the kept dtype of the hub's folder, {part: config}); the classes come from model_index.json
FLOW_FOLDERS = {
    "sd3": (
        "float16",
        {
            "transformer": SD35M_TRANSFORMER,
            "vae": FLOW_VAE,
            "text_encoder": CLIP_L,
            "text_encoder_2": CLIP_G,
            "text_encoder_3": T5_XXL,
        },
    ),
    "flux": (
        "bfloat16",
        {
            "transformer": FLUX_DEV_TRANSFORMER,
            "vae": FLOW_VAE,
            "text_encoder": CLIP_L,
            "text_encoder_2": T5_XXL,
        },
    ),
}
# tensors a transformers model ties to another and so does not save (T5's input embedding is `shared`)
TIED = {"encoder.embed_tokens.weight"}


def build_flow_folder(family: str, folder: Path) -> Path:
    """A diffusers folder of `family` ("sd3" / "flux") at real size; reused when complete."""
    done = folder / ".complete"
    if done.is_file():
        return folder
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "edtools", "make-tiny-model", f"--{family}", str(folder)],
        check=True,
        capture_output=True,
    )
    index = json.loads((folder / "model_index.json").read_text())
    dtype_name, parts = FLOW_FOLDERS[family]
    total = 0
    for part, config in parts.items():
        library, class_name = index[part]
        tiny_config = json.loads((folder / part / "config.json").read_text())
        if part == "vae":  # the family's latent scaling from its tiny VAE; the real VAEs encode in fp32
            keep = ("scaling_factor", "shift_factor")
            config = {**config, **{k: tiny_config[k] for k in keep}, "force_upcast": True}
        for old in (folder / part).iterdir():
            old.unlink()
        total += write_part(library, class_name, config, folder / part, dtype_name)
    done.write_text("")
    print(
        f"built {family}: {total / GIB:.2f} GiB of {dtype_name} weights in {time.monotonic() - started:.0f} s",
        flush=True,
    )
    return folder


def write_flux_single_file(folder: Path, file: Path) -> Path:
    """The Flux folder's transformer, VAE and CLIP-L as one bf16 single file in ComfyUI's checkpoint layout (T5
    comes from the folder, as such files lack it), edtools' own writer's keys; reused when complete. The tensors
    are streamed: safetensors' save_file serialises the whole dict in memory, 22 GiB here."""
    import torch

    from edtools.models import Keep, load_components
    from edtools.models.single_file_layout import original_state_dict

    if file.is_file():
        return file
    started = time.monotonic()
    # memory-mapped from the folder's shards; the fused tensors (qkv, linear1) are built as copies
    tensors = original_state_dict(load_components(str(folder), keep=Keep(torch.bfloat16)))
    size = stream_safetensors(tensors, file)
    print(f"wrote {file.name}: {size / GIB:.2f} GiB in {time.monotonic() - started:.0f} s", flush=True)
    return file


def write_scaled_fp8(single_file: Path, file: Path, t5_folder: Path | None = None) -> Path:
    """`single_file` with weights in ComfyUI's scaled float8 (e4m3 with a scale_weight each, the `scaled_fp8`
    marker); reused when complete. With `t5_folder`: the file's tensors as they are plus that folder's T5-XXL
    under text_encoders.t5xxl. (its blocks' Linear weights scaled, the rest fp16), as
    sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors holds it; without: the transformer's block weights
    scaled, as sd3.5_large_fp8_scaled.safetensors holds them."""
    import torch
    from safetensors import safe_open

    if file.is_file():
        return file
    started = time.monotonic()
    tensors: dict = {}
    with safe_open(str(single_file), framework="pt", device="cpu") as source:
        for key in source.keys():  # noqa: SIM118 (not a dict)
            value = source.get_tensor(key)
            blocks = t5_folder is None and key.startswith("model.diffusion_model.joint_blocks.")
            tensors.update(_scaled_fp8(key, value) if blocks and value.ndim == 2 else {key: value})
    prefix = "text_encoders.t5xxl.transformer."
    for shard in sorted((t5_folder / "text_encoder_3").glob("*.safetensors")) if t5_folder else ():
        with safe_open(str(shard), framework="pt", device="cpu") as source:
            for key in source.keys():  # noqa: SIM118 (not a dict)
                value = source.get_tensor(key)
                if key.startswith("encoder.block.") and value.ndim == 2:
                    tensors.update(_scaled_fp8(prefix + key, value))
                else:
                    tensors[prefix + key] = value.to(torch.float16)
    tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    size = stream_safetensors(tensors, file)
    print(f"wrote {file.name}: {size / GIB:.2f} GiB in {time.monotonic() - started:.0f} s", flush=True)
    return file


def _scaled_fp8(key: str, value) -> dict:
    """{key: value / scale in e4m3, <module>.scale_weight: scale}, the scale mapping the largest magnitude to
    e4m3's largest finite value (448), as ComfyUI's scaled float8 files store a weight."""
    import torch

    scale = value.float().abs().max() / 448
    return {
        key: (value.float() / scale).to(torch.float8_e4m3fn),
        key.removesuffix(".weight") + ".scale_weight": scale.reshape(1),
    }


def stream_safetensors(tensors: dict, file: Path) -> int:
    """Write `tensors` as a safetensors file one tensor at a time (safetensors' save_file serialises the whole
    dict in memory: 22 GiB for Flux); the bytes of tensor data written."""
    import torch

    names = {
        torch.bfloat16: "BF16",
        torch.float16: "F16",
        torch.float32: "F32",
        torch.int64: "I64",
        torch.float8_e4m3fn: "F8_E4M3",
    }
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    partial = file.with_suffix(".partial")
    with partial.open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for tensor in tensors.values():
            out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    partial.rename(file)
    return offset


def write_part(library: str, class_name: str, config: dict, folder: Path, dtype_name: str) -> int:
    """Write one part's config and random weights in `dtype_name` into `folder`; the bytes written."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    module = _meta_module(library, class_name, config)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items() if k not in TIED}
    if library == "diffusers":
        module.save_config(folder)
        stem = "diffusion_pytorch_model"
    else:
        module.config.architectures = [class_name]
        module.config.dtype = dtype_name
        module.config.save_pretrained(folder)
        stem = "model"
    shards = _shards(shapes, dtype.itemsize)
    pool = torch.randn(2**22, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(dtype)
    weight_map, total = {}, 0
    for number, keys in enumerate(shards, start=1):
        name = (
            f"{stem}.safetensors"
            if len(shards) == 1
            else f"{stem}-{number:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = {key: _filled(pool, shapes[key]) for key in keys}
        save_file(tensors, folder / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _meta_module(library: str, class_name: str, config: dict):
    import torch

    with torch.device("meta"):
        if library == "diffusers":
            import diffusers

            return getattr(diffusers, class_name)(**config)
        import transformers

        cls = getattr(transformers, class_name)
        return cls(cls.config_class(**config))


def _shards(shapes: dict[str, tuple], itemsize: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    return shards + [current] if current else shards


def _filled(pool, shape: tuple):
    """A tensor of `shape` from the pool's values (their order is of no matter to memory)."""
    n = math.prod(shape)
    repeats = -(-n // pool.numel())
    return pool.repeat(repeats)[:n].reshape(shape).clone()
