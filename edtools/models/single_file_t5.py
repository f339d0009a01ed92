"""T5-XXL read from a single file (ComfyUI's SD3.5 and Flux checkpoints that hold it under text_encoders.t5xxl.):
in 16/32-bit, in float8, or in ComfyUI's scaled float8, loaded as TrainConfig.t5 says by transformers' loader.

The encoder's config and tokenizer come from model_config (files hold neither); its weights never do, so a
config-only folder or hub id suffices. The file's tensors stay memory-mapped where they are kept in its dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ModelError, require
from .components import Keep
from .float8 import FLOAT8, dequantised, dequantised_on_disk

__all__ = ["load_t5_from_file", "t5_weights"]

logger = logging.getLogger(__name__)


def t5_weights(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor] | None:
    """The T5 encoder's tensors under `prefix` + "transformer." in transformers' names (prefix stripped), or
    None when the file holds no T5 (no `shared.weight`, the token embedding every T5 has)."""
    if not prefix:
        return None
    stem = prefix + "transformer."
    tensors = {key[len(stem) :]: value for key, value in state_dict.items() if key.startswith(stem)}
    return tensors if "shared.weight" in tensors else None


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
    if any(value.dtype in FLOAT8 for value in tensors.values()):
        # kept as it is, the dequantised copy is the model; quantised to 8-bit, it is a passing copy of T5's
        # size (9 GB for T5-XXL): written block by block to memory-mapped scratch files instead
        convert = dequantised_on_disk if keep.t5 == "8bit" else dequantised
        tensors = convert(tensors, dtype, keep_fp32)
    encoder = model_class.from_pretrained(None, config=config, state_dict=dict(tensors), dtype=dtype, **extra)
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
