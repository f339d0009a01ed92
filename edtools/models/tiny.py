"""Tiny SD-shaped models for tests and the demo: the real diffusers classes and file layout, random weights.

Generated vocabularies (CLIP's bytes, T5's characters, plus a few whole words) stand in for the tokenizer files.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from pathlib import Path

from ..errors import require
from .components import PREDICTION_TYPES, SDComponents
from .families import family, variants
from .families.base import TinyEncoder
from .sd import save_components

__all__ = ["ARCHITECTURES", "make_tiny_model", "tiny_components", "tiny_t5_tokenizer", "tiny_tokenizer"]

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


def tiny_t5_tokenizer(folder: Path, *, max_length: int):
    """A T5TokenizerFast of a generated sentencepiece-style unigram vocabulary (<pad> 0, </s> 1, <unk> 2;
    printable characters, "▁"-prefixed characters and words): unknown words split into characters, as T5's
    would, so distinct captions stay distinct."""
    transformers = require("transformers")
    tokenizers = require("tokenizers")
    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -5.0) for c in chars] + [("\u2581" + c, -4.0) for c in chars]
    vocab += [("\u2581" + word, -1.0) for word in _TINY_WORDS if len(word) > 1]
    backend = tokenizers.Tokenizer(tokenizers.models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = tokenizers.decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = transformers.T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return transformers.T5TokenizerFast.from_pretrained(folder, local_files_only=True)


ARCHITECTURES = variants()  # "sd1", "sd2", "sdxl": each registered family's variants


def _text_config(tokenizer, encoder: TinyEncoder):
    transformers = require("transformers")
    if encoder.kind == "t5":  # T5-XXL's kind: gated GELU, relative attention, no biases
        return transformers.T5Config(
            vocab_size=len(tokenizer),
            d_model=encoder.width,
            d_kv=encoder.width // 4,
            d_ff=2 * encoder.width,
            num_layers=encoder.layers,
            num_heads=4,
            feed_forward_proj=encoder.act,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    extra = {} if encoder.projection is None else {"projection_dim": encoder.projection}
    return transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=encoder.width,
        intermediate_size=2 * encoder.width,
        num_hidden_layers=encoder.layers,
        num_attention_heads=4,
        hidden_act=encoder.act,
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

    The UNet and text encoders are the family's (Family.tiny: sd1 CLIP text encoder, sd2 OpenCLIP-style, sdxl
    two encoders and size/crop conditioning). VAE: 4 levels (downsample 8, like SD). real_blocks: the real
    block structure, else a UNet with one plain and one cross-attention level. DDPM scheduler like SD's.
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

    fam = family(architecture)
    spec = fam.tiny(architecture, real_blocks=real_blocks)
    with tempfile.TemporaryDirectory(prefix="edtools-tokenizer-") as tmp:
        tokenizers = [
            tiny_t5_tokenizer(Path(tmp) / str(i + 1), max_length=encoder.tokens)
            if encoder.kind == "t5"
            else tiny_tokenizer(Path(tmp) / str(i + 1), pad_token=encoder.pad_token)
            for i, encoder in enumerate(spec.encoders)
        ]
    # Module constructors draw initial weights from torch's global generator: seed a forked copy of it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser_class = getattr(diffusers, fam.denoiser_class)
        sized = "sample_size" in inspect.signature(denoiser_class.__init__).parameters  # Flux's has no size
        unet = denoiser_class(**spec.unet, **({"sample_size": sample_size} if sized else {}))
        extra_vae = {} if spec.vae_quant_conv else {"use_quant_conv": False, "use_post_quant_conv": False}
        if spec.vae_shift_factor is not None:
            extra_vae["shift_factor"] = spec.vae_shift_factor
        vae = diffusers.AutoencoderKL(
            sample_size=sample_size * 8,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=2 if real_blocks else 1,
            latent_channels=spec.vae_latent_channels,
            norm_num_groups=8,
            scaling_factor=spec.vae_scaling_factor,
            force_upcast=spec.vae_force_upcast,
            **extra_vae,
        )
        text: dict = {}
        for encoder_spec, text_spec, tokenizer in zip(
            fam.text_encoders, spec.encoders, tokenizers, strict=True
        ):
            model_class = getattr(transformers, encoder_spec.model_class)
            text[encoder_spec.part] = model_class(_text_config(tokenizer, text_spec))
            if (
                text_spec.identity_projection
            ):  # as the real model's (SD3's CLIP-L pooled output is unprojected)
                torch.nn.init.eye_(text[encoder_spec.part].text_projection.weight)
            text[encoder_spec.tokenizer] = tokenizer
    if spec.scheduler is not None:  # a family's own training scheduler (SD3: flow matching)
        noise_scheduler = getattr(diffusers, fam.noise_scheduler_class)(**spec.scheduler)
    else:
        noise_scheduler = diffusers.DDPMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            prediction_type=prediction_type,
            steps_offset=1,
        )
    components = SDComponents(unet=unet, vae=vae, noise_scheduler=noise_scheduler, **text)
    for module in (unet, vae, *components.text_encoders):
        module.eval()
    return components


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
