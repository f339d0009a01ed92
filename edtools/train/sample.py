"""Sample images during training: one PNG grid per sampling, the same seeds every time, no effect on training.

Sampling runs the model's own pipeline on the training modules, with every random state kept aside.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import atomic_file
from ..config import TrainConfig
from ..errors import require
from .step import autocast

if TYPE_CHECKING:
    from ..models import SDComponents

__all__ = ["SAMPLES_DIR", "save_samples"]

SAMPLES_DIR = "samples"


@contextmanager
def _rng_kept(device: Any):
    """Run a block without disturbing any global random state (torch CPU/CUDA, numpy, python)."""
    torch = require("torch")
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


def _grid(images: list, prompts: Sequence[str], columns: int = 4) -> Any:
    """Images in rows of `columns`, each with its prompt written under it."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    tile_w, tile_h = images[0].size
    size = max(10, tile_w // 24)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    chars = max(8, int(tile_w / (size * 0.55)))
    captions = [textwrap.wrap(p, chars)[:3] for p in prompts]
    caption_h = (size + 2) * max(len(c) for c in captions) + 6
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * tile_w, rows * (tile_h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % columns) * tile_w, (i // columns) * (tile_h + caption_h)
        grid.paste(image.convert("RGB"), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 3, y + tile_h + 3 + j * (size + 2)), line, fill="black", font=font)
    return grid


def save_samples(
    components: SDComponents,
    config: TrainConfig,
    folder: str | os.PathLike,
    global_step: int,
    device: Any,
    text_cache: Any = None,
) -> tuple[Path, ...]:
    """Generate one image per sample prompt (seed + prompt number, so every sampling is comparable) and save
    them as one PNG grid folder/step-<global_step>.png, through the model's own pipeline (LoRA adapters at
    work). Train/eval modes, the text encoders' devices (they may wait on the CPU beside cached embeddings)
    and all RNG states are restored, so sampling never changes the training result. text_cache: the run's
    TextEmbeddingCache; when it freed a text encoder (T5) the prompts are given to the pipeline as their cached
    embeddings (the cache holds the sample prompts and the empty negative prompt), so no encoder runs."""
    torch = require("torch")
    from ..models import make_pipeline
    from ..models.families import family_of

    cached = text_cache is not None and bool(text_cache.freed)
    modules = [components.unet, *components.text_encoders, components.vae]
    modes = [m.training for m in modules]
    moved = () if cached else components.text_encoders
    encoder_devices = [next(e.parameters()).device for e in moved]
    pipeline = make_pipeline(components)
    images = []
    try:
        for m in modules:
            m.eval()
        for encoder in moved:
            encoder.to(device)
        with _rng_kept(device), torch.no_grad(), autocast(config, device):
            prompts = list(config.sample_prompts)
            for start in range(0, len(prompts), 4):
                chunk = prompts[start : start + 4]
                generators = [
                    torch.Generator("cpu").manual_seed(config.seed + start + i) for i in range(len(chunk))
                ]
                if cached:
                    text = family_of(components).pipeline_embeddings(
                        components, text_cache.get(chunk), text_cache.get([""] * len(chunk)), device=device
                    )
                else:
                    text = {"prompt": chunk}
                images += pipeline(
                    **text,
                    height=config.resolution,
                    width=config.resolution,
                    num_inference_steps=config.sample_steps,
                    guidance_scale=config.sample_guidance_scale,
                    generator=generators,
                ).images
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
        for encoder, encoder_device in zip(moved, encoder_devices, strict=True):
            encoder.to(encoder_device)
    path = Path(folder) / f"step-{global_step:08d}.png"
    with atomic_file(path) as tmp:
        _grid(images, config.sample_prompts).save(tmp, format="PNG")
    return (path,)
