"""T5-XXL read from a single file (ComfyUI's SD3.5 and Flux checkpoints that hold it under text_encoders.t5xxl.):
in 16/32-bit, in float8, or in ComfyUI's scaled float8, loaded as TrainConfig.t5 says by transformers' loader.

The encoder's config and tokenizer come from model_config (files hold neither); its weights never do, so a
config-only folder or hub id suffices. The file's tensors stay memory-mapped where they are kept in its dtype.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError, require
from .components import Keep

__all__ = ["FLOAT8", "SCALE_SUFFIXES", "dequantised", "load_t5_from_file", "t5_weights"]

logger = logging.getLogger(__name__)

FLOAT8 = frozenset(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)  # fmt: skip
# ComfyUI's scaled float8 files: a `scaled_fp8` marker tensor, per weight `<module>.scale_weight` (the real
# weight is the stored one times it) and sometimes `<module>.scale_input` (for fp8 matmuls; not a weight)
_MARKER, _SCALE, _INPUT_SCALE = "scaled_fp8", ".scale_weight", ".scale_input"
SCALE_SUFFIXES = (_SCALE, _INPUT_SCALE)


def t5_weights(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor] | None:
    """The T5 encoder's tensors under `prefix` + "transformer." in transformers' names (prefix stripped), or
    None when the file holds no T5 (no `shared.weight`, the token embedding every T5 has)."""
    if not prefix:
        return None
    stem = prefix + "transformer."
    tensors = {key[len(stem) :]: value for key, value in state_dict.items() if key.startswith(stem)}
    return tensors if "shared.weight" in tensors else None


def dequantised(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, keep_fp32: frozenset[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """The weights with float8 ones in `dtype` (float32 for those of modules named in keep_fp32, as
    transformers keeps T5's `wo` in fp16 loads), each scaled one multiplied by its scale_weight in float32
    first; the scales and the marker dropped. Other tensors are returned as they are (no copy)."""
    out = {}
    for key, value in tensors.items():
        if key == _MARKER or key.endswith(SCALE_SUFFIXES):
            continue
        if value.dtype not in FLOAT8:
            out[key] = value
            continue
        target = torch.float32 if keep_fp32 & set(key.split(".")) else dtype
        scale = tensors.get(key.removesuffix(".weight") + _SCALE) if key.endswith(".weight") else None
        if scale is None and _MARKER in tensors:
            raise ModelError(
                f"the T5 weight {key} is scaled float8 (the file has {_MARKER}) but has no {_SCALE}: the file is "
                "damaged or of a layout edtools does not know; use a T5 in 16-bit (e.g. from model_config)"
            )
        real = value.to(torch.float32) if scale is None else value.to(torch.float32) * scale.to(torch.float32)
        out[key] = real.to(target)
    return out


def _dequantised_on_disk(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, keep_fp32: frozenset[str], folder: Path
) -> dict[str, torch.Tensor]:
    """dequantised(), a block at a time, each block's float8 weights written to a safetensors file in `folder`
    and read back memory-mapped: host memory holds one block's copy at a time."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    groups: dict[str, list[str]] = {}
    for key in tensors:
        groups.setdefault(".".join(key.split(".")[:3]), []).append(key)  # "encoder.block.7", "shared.weight"
    marker = {_MARKER: tensors[_MARKER]} if _MARKER in tensors else {}
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
                    f"cannot write the float8 T5's scratch files to {folder.parent} ({exc}): loading it in 8-bit "
                    "needs free disk of its 16-bit size there (9 GB for T5-XXL); free some, or point TMPDIR "
                    "at a drive with room"
                ) from exc
            del part, converted
            with safe_open(str(path), framework="pt", device="cpu") as file:
                out.update((key, file.get_tensor(key)) for key in file.keys())  # noqa: SIM118 (not a dict)
    return out


def load_t5_from_file(
    tensors: Mapping[str, torch.Tensor], spec: Any, source: str, keep: Keep, hub: dict, path: str
) -> dict[str, Any]:
    """{encoder part: T5 from the file's tensors (t5_weights), tokenizer part: its tokenizer}, the config
    and tokenizer from `source`; in the dtype the part is kept in, or in 8-bit when keep.t5 says so. A weight
    the config describes that the file lacks, or one the file has that it does not describe, is an error:
    a T5 of another size than the model's."""
    transformers = require("transformers")
    model_class = getattr(transformers, spec.model_class)
    dtype = keep.dtype_of(spec.part)
    try:
        # a missing config.json gives transformers' defaults (t5-small's), not an error: ask for it first
        if not model_class.config_class.get_config_dict(source, subfolder=spec.part, **hub)[0]:
            raise OSError(f"no {spec.part}/config.json")
        config = model_class.config_class.from_pretrained(source, subfolder=spec.part, **hub)
        tokenizer = getattr(transformers, spec.tokenizer_class).from_pretrained(
            source, subfolder=spec.tokenizer, **hub
        )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{path} holds a T5-XXL text encoder, whose config and tokenizer come from model_config, but "
            f"{source} has no {spec.part} / {spec.tokenizer} ({exc}); give a model_config of the same model "
            "(its diffusers folder or hub id; only configs and the tokenizer are read)"
        ) from exc
    extra: dict[str, Any] = {}
    if keep.t5 == "8bit":
        from .quantize import t5_8bit_loading

        extra = t5_8bit_loading(keep.device)
    keep_fp32 = frozenset(getattr(model_class, "_keep_in_fp32_modules", None) or ())
    keep_fp32 = keep_fp32 if dtype == torch.float16 else frozenset()
    with tempfile.TemporaryDirectory(prefix="edtools-t5-") as scratch:
        if any(value.dtype in FLOAT8 for value in tensors.values()):
            # kept as it is, the dequantised copy is the model; quantised to 8-bit, it is a passing copy of
            # T5's size (9 GB for T5-XXL): written block by block to memory-mapped scratch files instead
            quantised = keep.t5 == "8bit"
            tensors = (
                _dequantised_on_disk(tensors, dtype, keep_fp32, Path(scratch))
                if quantised
                else dequantised(tensors, dtype, keep_fp32)
            )
        encoder = model_class.from_pretrained(
            None, config=config, state_dict=dict(tensors), dtype=dtype, **extra
        )
    # transformers fills a weight the state dict lacks with random values and drops unknown ones: compare
    expected = {name for name, _ in encoder.named_parameters(remove_duplicate=False)}
    tied = {"encoder.embed_tokens.weight"}  # shares shared.weight: files hold one of the two
    missing = sorted(expected - set(tensors) - tied)
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ModelError(
            f"the T5-XXL in {path} does not fit the {spec.part} config of {source}: "
            + "; ".join(
                f"{what} {len(keys)} weights (e.g. {', '.join(keys[:3])})"
                for what, keys in (("it lacks", missing), ("it has unknown", unexpected))
                if keys
            )
            + "; give a model_config of the model the file is of"
        )
    logger.info("%s: T5-XXL text encoder read from the file (%d tensors)", path, len(tensors))
    if keep.t5 != "8bit":
        encoder = keep.place(encoder)
    return {spec.part: encoder.eval(), spec.tokenizer: tokenizer}
