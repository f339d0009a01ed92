"""Models: load Stable Diffusion from a diffusers folder or hub id, save it, and build tiny ones for tests.

`sd` loads and saves diffusers folders; `tiny` builds small random models with the real classes.
"""

from .sd import (
    PREDICTION_TYPES,
    SDComponents,
    guess_architecture,
    load_components,
    make_pipeline,
    save_components,
)
from .tiny import make_tiny_model, tiny_components, tiny_tokenizer

__all__ = [
    "PREDICTION_TYPES",
    "SDComponents",
    "guess_architecture",
    "load_components",
    "make_pipeline",
    "make_tiny_model",
    "save_components",
    "tiny_components",
    "tiny_tokenizer",
]
