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

__all__ = ["ARCHITECTURES", "make_tiny_model", "tiny_components", "tiny_tokenizer"]

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


def tiny_tokenizer(folder: Path, *, pad_token: str | None = None):
    """A CLIPTokenizer from generated vocab.json / merges.txt files (model_max_length 77, like SD).
    pad_token "!" is SDXL's second tokenizer (the default pads with <|endoftext|>)."""
    transformers = require("transformers")
    vocab, merges = _tiny_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}
    if pad_token is not None:
        config["pad_token"] = pad_token
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)


ARCHITECTURES = ("sd1", "sd2", "sdxl")


def _unet_config(architecture: str, real_blocks: bool, sample_size: int, cross_attention_dim: int) -> dict:
    """A UNet2DConditionModel config: small and fast by default; real_blocks keeps the real models' block
    structure (SD 1/2: 4 levels, SDXL: 3 levels with transformer depths 1, 2, 3; 2 layers per block)."""
    common = dict(sample_size=sample_size, in_channels=4, out_channels=4, norm_num_groups=8)
    common["cross_attention_dim"] = cross_attention_dim
    if architecture == "sdxl":
        levels = 3 if real_blocks else 2
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
        return dict(
            common,
            block_out_channels=(8, 16, 32)[-levels:] if real_blocks else (16, 32),
            layers_per_block=2 if real_blocks else 1,
            down_block_types=down,
            up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
            transformer_layers_per_block=(1, 2, 3)[:levels] if real_blocks else (1, 2),
            attention_head_dim=(2, 4, 8)[:levels],
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=_TE2_PROJECTION + 6 * 8,
        )
    down = (
        ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
        if real_blocks
        else ("DownBlock2D", "CrossAttnDownBlock2D")
    )
    return dict(
        common,
        block_out_channels=(8, 16, 16, 32) if real_blocks else (16, 32),
        layers_per_block=2 if real_blocks else 1,
        down_block_types=down,
        up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
        attention_head_dim=(2, 4, 4, 8) if architecture == "sd2" and real_blocks else 4,
        use_linear_projection=architecture == "sd2",
    )


_TE_WIDTH = 32
_TE2_WIDTH = 64
_TE2_PROJECTION = 32


def _text_config(tokenizer, *, width: int, layers: int, act: str, projection: int | None = None):
    transformers = require("transformers")
    extra = {} if projection is None else {"projection_dim": projection}
    return transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        hidden_act=act,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def tiny_components(
    architecture: str = "sd1",
    *,
    seed: int = 0,
    prediction_type: str = "epsilon",
    sample_size: int = 16,
    real_blocks: bool = False,
) -> SDComponents:
    """Randomly initialised tiny components (seeded) of the real diffusers/transformers classes.

    sd1: CLIP text encoder (quick_gelu, width 32); sd2: OpenCLIP-style text encoder (gelu) and linear attention
    projections; sdxl: a second text encoder with projection (width 64) and size/crop conditioning. VAE:
    4 levels (downsample 8, like SD). real_blocks: the real block structure (see _unet_config), else a UNet
    with one plain and one cross-attention level. DDPM scheduler like SD's.
    """
    torch = require("torch")
    diffusers = require("diffusers")
    transformers = require("transformers")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture is '{architecture}'; allowed: {', '.join(ARCHITECTURES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type is '{prediction_type}'; allowed: {', '.join(PREDICTION_TYPES)}")
    if sample_size < 1:
        raise ValueError(f"sample_size (latent side) must be >= 1, got {sample_size}")

    sdxl = architecture == "sdxl"
    with tempfile.TemporaryDirectory(prefix="edtools-tokenizer-") as tmp:
        tokenizer = tiny_tokenizer(Path(tmp) / "1")
        tokenizer_2 = tiny_tokenizer(Path(tmp) / "2", pad_token="!") if sdxl else None
    act = "gelu" if architecture == "sd2" else "quick_gelu"
    cross_attention_dim = _TE_WIDTH + (_TE2_WIDTH if sdxl else 0)
    # Module constructors draw initial weights from torch's global generator: seed a forked copy of it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(
            **_unet_config(architecture, real_blocks, sample_size, cross_attention_dim)
        )
        vae = diffusers.AutoencoderKL(
            sample_size=sample_size * 8,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=2 if real_blocks else 1,
            latent_channels=4,
            norm_num_groups=8,
            scaling_factor=0.13025 if sdxl else 0.18215,
            force_upcast=sdxl,
        )
        text_encoder = transformers.CLIPTextModel(_text_config(tokenizer, width=_TE_WIDTH, layers=2, act=act))
        text_encoder_2 = None
        if sdxl:  # 10 layers when real: diffusers recognises SDXL files by the second encoder's 10th block
            config_2 = _text_config(
                tokenizer_2,
                width=_TE2_WIDTH,
                layers=10 if real_blocks else 2,
                act="gelu",
                projection=_TE2_PROJECTION,
            )
            text_encoder_2 = transformers.CLIPTextModelWithProjection(config_2)
    noise_scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=prediction_type,
        steps_offset=1,
    )
    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is not None:
            module.eval()
    return SDComponents(
        unet,
        text_encoder,
        tokenizer,
        vae,
        noise_scheduler,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def make_tiny_model(
    out_dir: str | os.PathLike,
    architecture: str = "sd1",
    *,
    seed: int = 0,
    prediction_type: str = "epsilon",
    sample_size: int = 16,
    real_blocks: bool = False,
) -> Path:
    """Write a tiny SD-shaped diffusers pipeline folder (random weights; seed fixes them); see tiny_components.

    sample_size is the UNet's latent side; the VAE's is 8x that (pipelines default to that many pixels).
    """
    components = tiny_components(
        architecture,
        seed=seed,
        prediction_type=prediction_type,
        sample_size=sample_size,
        real_blocks=real_blocks,
    )
    return save_components(components, out_dir)
