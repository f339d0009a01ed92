"""Models: Stable Diffusion 1.x/2.x and SDXL from diffusers folders, hub ids or single files; LoRA; tiny ones.

`sd` loads and saves diffusers folders; `single_file` reads A1111/ComfyUI files and `single_file_layout` writes
them; `conditioning` is where SD and SDXL differ; `lora` adds and saves adapters; `tiny` builds test models.
"""

from .sd import (
    PREDICTION_TYPES,
    Keep,
    SDComponents,
    guess_architecture,
    load_components,
    make_pipeline,
    save_components,
)
from .single_file import load_single_file, read_state_dict
from .single_file_layout import save_single_file
from .tiny import make_tiny_model, tiny_components, tiny_tokenizer

__all__ = [
    "PREDICTION_TYPES",
    "Keep",
    "SDComponents",
    "guess_architecture",
    "load_components",
    "make_pipeline",
    "make_tiny_model",
    "load_single_file",
    "read_state_dict",
    "save_components",
    "save_single_file",
    "tiny_components",
    "tiny_tokenizer",
]
