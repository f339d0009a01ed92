"""Float8 weights in single files (fp8_e4m3fn files, and ComfyUI's scaled float8: each stored weight times its
scale_weight): dequantised into the dtype a part is kept in, at once or a block at a time through scratch files.

Used for a file's T5-XXL (models.single_file_t5) and a file's scaled float8 transformer (models.single_file).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import ModelError

__all__ = ["FLOAT8", "SCALE_SUFFIXES", "dequantise_scaled", "dequantised", "dequantised_on_disk", "is_marker"]

logger = logging.getLogger(__name__)

FLOAT8 = frozenset(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)  # fmt: skip
# ComfyUI's scaled float8 files: a `scaled_fp8` marker tensor, per weight `<module>.scale_weight` (the real
# weight is the stored one times it) and sometimes `<module>.scale_input` (for fp8 matmuls; not a weight)
_MARKER, _SCALE, _INPUT_SCALE = "scaled_fp8", ".scale_weight", ".scale_input"
SCALE_SUFFIXES = (_SCALE, _INPUT_SCALE)


def is_marker(key: str) -> bool:
    """Whether a key is the scaled_fp8 marker (bare, or under a part's prefix)."""
    return key == _MARKER or key.endswith("." + _MARKER)


def _block(key: str) -> str:
    """The key up to its first number: the block a weight belongs to ("encoder.block.7",
    "model.diffusion_model.joint_blocks.3"); "" for weights outside numbered blocks."""
    parts = key.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return ""


def dequantised(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, keep_fp32: frozenset[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """The weights with float8 ones in `dtype` (float32 for those of modules named in keep_fp32, as
    transformers keeps T5's `wo` in fp16 loads), each scaled one multiplied by its scale_weight in float32
    first; the scales and the marker dropped. Other tensors are returned as they are (no copy)."""
    out = {}
    scaled = any(is_marker(key) for key in tensors)
    for key, value in tensors.items():
        if is_marker(key) or key.endswith(SCALE_SUFFIXES):
            continue
        if value.dtype not in FLOAT8:
            out[key] = value
            continue
        target = torch.float32 if keep_fp32 & set(key.split(".")) else dtype
        scale = tensors.get(key.removesuffix(".weight") + _SCALE) if key.endswith(".weight") else None
        if scale is None and scaled:
            raise ModelError(
                f"the weight {key} is scaled float8 (the file has {_MARKER}) but has no {_SCALE}: the file is "
                "damaged or of a layout edtools does not know; use the model's 16-bit file"
            )
        real = value.to(torch.float32) if scale is None else value.to(torch.float32) * scale.to(torch.float32)
        out[key] = real.to(target)
    return out


def dequantised_on_disk(
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    keep_fp32: frozenset[str] = frozenset(),
    folder: Path | None = None,
) -> dict[str, torch.Tensor]:
    """dequantised(), a block at a time, each block's float8 weights written to a safetensors file in `folder`
    (None: a temporary one) and read back memory-mapped: host memory holds one block's copy at a time."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    if folder is None:
        # the scratch files go at once: their memory maps keep the data (and the disk) until the tensors go
        with tempfile.TemporaryDirectory(prefix="edtools-float8-", ignore_cleanup_errors=True) as scratch:
            return dequantised_on_disk(tensors, dtype, keep_fp32, Path(scratch))

    groups: dict[str, list[str]] = {}
    for key in tensors:
        if not is_marker(key):
            groups.setdefault(_block(key), []).append(key)
    marker = {_MARKER: torch.empty(0)} if any(is_marker(key) for key in tensors) else {}
    out: dict[str, torch.Tensor] = {}
    for index, keys in enumerate(groups.values()):
        part = dequantised({**marker, **{key: tensors[key] for key in keys}}, dtype, keep_fp32)
        converted = {key: value for key, value in part.items() if tensors[key].dtype in FLOAT8}
        out.update((key, value) for key, value in part.items() if key not in converted)
        if converted:
            path = folder / f"block-{index}.safetensors"
            try:
                save_file({key: value.contiguous() for key, value in converted.items()}, str(path))
            except (OSError, SafetensorError) as exc:  # safetensors reports a full drive as its own error
                raise ModelError(
                    f"cannot write the dequantised float8 weights' scratch files to {folder.parent} ({exc}): "
                    "they need free disk of the weights' 16-bit size there (9 GB for T5-XXL, 22 GB for a Flux "
                    "transformer); free some, or point TMPDIR at a drive with room"
                ) from exc
            del part, converted
            with safe_open(str(path), framework="pt", device="cpu") as file:
                out.update((key, file.get_tensor(key)) for key in file.keys())  # noqa: SIM118 (not a dict)
    return out


def dequantise_scaled(
    state_dict: dict[str, torch.Tensor],
    prefix: str,
    dtype: torch.dtype,
    label: str,
    path: str,
    skip: str = "",
) -> None:
    """In place: a single file's scaled float8 weights under `prefix` (a transformer in ComfyUI's fp8_scaled
    files) times their scales, in `dtype`, a block at a time through scratch files (dequantised_on_disk: no
    16-bit copy in RAM). Scaled weights elsewhere are refused, but those under `skip` (a T5, read apart);
    plain float8 weights need nothing: diffusers' readers cast each to its part's dtype."""
    scaled = [k for k in state_dict if k.endswith(SCALE_SUFFIXES) and not (skip and k.startswith(skip))]
    if not scaled:
        return
    elsewhere = [k for k in scaled if not k.startswith(prefix)]
    if elsewhere:
        raise ModelError(
            f"{path} holds scaled float8 weights outside its {label} ({elsewhere[0]} and {len(elsewhere) - 1} "
            "more), a layout edtools does not read: use the model's 16-bit file or its diffusers folder or hub id"
        )
    markers = [k for k in state_dict if is_marker(k)]
    chosen = [
        k for k in state_dict if k.startswith(prefix) and (state_dict[k].dtype in FLOAT8 or k in scaled)
    ]
    part = {key: state_dict.pop(key) for key in chosen + markers}
    state_dict.update(dequantised_on_disk(part, dtype))
    logger.info("%s: the %s's scaled float8 weights dequantised to %s", path, label, dtype)
