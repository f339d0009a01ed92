"""Models: Stable Diffusion 1.x/2.x and SDXL from diffusers folders, hub ids or single files; LoRA; tiny ones.

`families` holds one module per model family (what differs between SD and SDXL); `objective` the denoiser's
target; `components` the loaded parts;
`sd` loads and saves diffusers folders; `single_file` reads A1111/ComfyUI files and `single_file_layout` writes
them (key tables in `keymap`); `conditioning` encodes text; `lora` adds and saves adapters; `tiny` builds test
models.
"""

from .components import PREDICTION_TYPES, Keep, SDComponents
from .families import family, family_of, guess_architecture
from .sd import load_components, make_pipeline, save_components
from .single_file import load_single_file, read_state_dict
from .single_file_layout import save_single_file
from .tiny import make_tiny_model, tiny_components, tiny_tokenizer

__all__ = [
    "PREDICTION_TYPES",
    "Keep",
    "SDComponents",
    "family",
    "family_of",
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
