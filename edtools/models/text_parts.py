"""Loading a diffusers folder's text encoders as TrainConfig.t5 says: as they are, a T5 in 8-bit, or T5 dropped.

Shared by the folder loader (models.sd) and the single-file loader, which takes an optional T5 from model_config.
"""

from __future__ import annotations

from typing import Any

from ..errors import ModelError, require
from .components import Keep
from .families import Family

__all__ = ["check_t5_setting", "load_text_encoder", "optional_text_parts", "present"]


def check_t5_setting(family: Family, keep: Keep, model: str) -> None:
    """keep.t5 other than "load" is for a family with a T5 encoder; "drop" for one that can do without it."""
    if keep.t5 == "load":
        return
    t5 = [spec for spec in family.text_encoders if spec.is_t5]
    if not t5:
        raise ModelError(
            f"t5 is '{keep.t5}', but '{model}' is a {family.label} model, which has no T5 text encoder: set t5 load"
        )
    if keep.t5 == "drop" and not all(spec.optional for spec in t5):
        raise ModelError(
            f"t5 is 'drop', but {family.label} models are conditioned on T5's hidden states and have no mode "
            "without it: set t5 load, or 8bit (on a CUDA GPU) to halve its memory"
        )


def present(index: dict, spec: Any) -> bool:
    """Whether a model_index.json has an optional text encoder (SD3 folders saved without T5 say [null, null])."""
    entry = index.get(spec.part)
    return bool(entry) and entry[0] is not None


def load_text_encoder(source: str, spec: Any, keep: Keep, hub: dict) -> Any:
    """One text encoder of a diffusers folder or hub id in the dtype it is kept in, placed on keep.device; a T5
    with keep.t5 "8bit" quantised by bitsandbytes (LLM.int8) while it loads, straight onto the device
    (transformers then keeps T5's `wo` layers in float32, as it does when loading it in float16)."""
    transformers = require("transformers")
    model_class = getattr(transformers, spec.model_class)
    dtype = keep.dtype_of(spec.part)
    if spec.is_t5 and keep.t5 == "8bit":
        from .quantize import t5_8bit_loading

        return model_class.from_pretrained(
            source, subfolder=spec.part, dtype=dtype, **t5_8bit_loading(keep.device), **hub
        )
    return keep.place(model_class.from_pretrained(source, subfolder=spec.part, dtype=dtype, **hub))


def wanted(spec: Any, keep: Keep, index: dict) -> bool:
    """Whether an optional encoder loads: the model has it and keep.t5 does not drop it."""
    return present(index, spec) and not (spec.is_t5 and keep.t5 == "drop")


def optional_text_parts(
    source: str, family: Family, keep: Keep, hub: dict, skip: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """{part: encoder, tokenizer part: tokenizer} of the family's optional encoders (SD3's T5) that a diffusers
    folder or hub id (a single file's model_config) has, but those in `skip` (a single file's own T5)."""
    optional = [spec for spec in family.text_encoders if spec.optional and spec.part not in skip]
    if not optional:
        return {}
    diffusers = require("diffusers")
    transformers = require("transformers")
    index = dict(diffusers.DiffusionPipeline.load_config(source, **hub))
    text: dict[str, Any] = {}
    for spec in optional:
        if wanted(spec, keep, index):
            text[spec.part] = load_text_encoder(source, spec, keep, hub)
            text[spec.tokenizer] = getattr(transformers, spec.tokenizer_class).from_pretrained(
                source, subfolder=spec.tokenizer, **hub
            )
    return text
