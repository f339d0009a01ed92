"""Tiny SD-shaped models for tests and the demo: the real diffusers classes and file layout, random weights.

A generated CLIP vocabulary (bytes plus a few whole words) stands in for the real tokenizer files.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import require
from .sd import PREDICTION_TYPES, SDComponents, save_components

__all__ = ["make_tiny_model", "tiny_components", "tiny_tokenizer"]

# Words that get whole-word BPE merges, so captions tokenize like a real CLIP vocabulary would.
_TINY_WORDS = (
    "a", "an", "the", "of", "in", "and", "with", "photo", "painting", "drawing", "portrait", "style",
    "person", "man", "woman", "dog", "cat", "red", "blue", "green",
)  # fmt: skip


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _tiny_vocab() -> tuple[dict[str, int], list[str]]:
    """A CLIP-format vocab (bytes, bytes + </w>, merged words, special tokens) and its merges."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in _TINY_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: "p h", "ph o", ... "phot o</w>"
            merge = f"{parts[0]} {parts[1]}"
            merged = parts[0] + parts[1]
            if merge not in merges:
                merges.append(merge)
                if merged not in tokens:
                    tokens.append(merged)
            parts = [merged] + parts[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def tiny_tokenizer(folder: Path):
    """A CLIPTokenizer from generated vocab.json / merges.txt files (model_max_length 77, like SD)."""
    transformers = require("transformers")
    vocab, merges = _tiny_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}), encoding="utf-8"
    )
    return transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def tiny_components(
    *, seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 16
) -> SDComponents:
    """Randomly initialised tiny SD components (seeded): UNet with one plain and one cross-attention block,
    2-layer CLIP text encoder of width 32, 4-level VAE (downsample 8, like SD), DDPM scheduler like SD's."""
    torch = require("torch")
    diffusers = require("diffusers")
    transformers = require("transformers")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type is '{prediction_type}'; allowed: {', '.join(PREDICTION_TYPES)}")
    if sample_size < 1:
        raise ValueError(f"sample_size (latent side) must be >= 1, got {sample_size}")

    with tempfile.TemporaryDirectory(prefix="edtools-tokenizer-") as tmp:
        tokenizer = tiny_tokenizer(Path(tmp))
    # Module constructors draw initial weights from torch's global generator: seed a forked copy of it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        vae = diffusers.AutoencoderKL(
            sample_size=sample_size * 8,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
        )
        text_encoder = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    noise_scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=prediction_type,
        steps_offset=1,
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    return SDComponents(unet, text_encoder, tokenizer, vae, noise_scheduler)


def make_tiny_model(
    out_dir: str | os.PathLike, *, seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 16
) -> Path:
    """Write a tiny SD-shaped diffusers pipeline folder (random weights; seed fixes them).

    sample_size is the UNet's latent side; the VAE's is 8x that (pipelines default to that many pixels).
    """
    return save_components(
        tiny_components(seed=seed, prediction_type=prediction_type, sample_size=sample_size), out_dir
    )
