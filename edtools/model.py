"""Stable Diffusion components: load a diffusers model, save one atomically, build a tiny one for tests.

Everything works on a plain diffusers folder (model_index.json + unet/vae/text_encoder/tokenizer/scheduler).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "SDComponents",
    "load_components",
    "make_pipeline",
    "make_tiny_model",
    "save_components",
    "tiny_components",
]

PREDICTION_TYPES = ("epsilon", "v_prediction")
_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_MISSING_TRAIN_EXTRAS = "edtools training needs {}: pip install -r requirements.txt"


def _require(module: str) -> Any:
    """Import a heavy training dependency, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(_MISSING_TRAIN_EXTRAS.format(module.split(".")[0])) from exc


@dataclass
class SDComponents:
    """The five parts training touches. noise_scheduler is a DDPMScheduler built from the model's own
    scheduler config, so betas and prediction_type ("epsilon" / "v_prediction") are the model's."""

    unet: Any  # diffusers UNet2DConditionModel
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    vae: Any  # diffusers AutoencoderKL
    noise_scheduler: Any  # diffusers DDPMScheduler

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


# ---------------------------------------------------------------------------------------------------------
# Loading


def _check_model_folder(folder: Path) -> None:
    """Raise with what is missing and what to do when a folder is not a diffusers SD model."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(
            f"model folder {folder} has no model_index.json, so it is not a diffusers model folder. "
            "Point `model` at a diffusers Stable Diffusion folder (with unet/, vae/, text_encoder/, tokenizer/, "
            "scheduler/) or a Hugging Face hub id; convert a single .ckpt/.safetensors file first with "
            "diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py"
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{index_file} is not valid JSON ({exc}); re-download or re-save the model") from exc
    if "text_encoder_2" in index or "transformer" in index:
        kind = index.get("_class_name", "this pipeline")
        raise ValueError(
            f"{folder} is a {kind} model; edtools trains Stable Diffusion 1.x/2.x "
            "(one CLIP text encoder and a UNet2DConditionModel)"
        )
    missing = [name for name in _SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise ValueError(
            f"model folder {folder} lacks {', '.join(s + '/' for s in missing)}; a Stable Diffusion diffusers "
            f"folder needs all of {', '.join(s + '/' for s in _SUBFOLDERS)}"
        )


def load_components(
    model: str, *, dtype: torch.dtype | None = None, local_files_only: bool | None = None
) -> SDComponents:
    """Load unet, vae, text encoder, tokenizer and a DDPM noise scheduler from a diffusers folder (always
    offline) or a Hugging Face hub id (local_files_only=None leaves the HF_HUB_OFFLINE setting in charge).

    dtype: torch dtype for the weights (None = float32).
    """
    torch = _require("torch")
    diffusers = _require("diffusers")
    transformers = _require("transformers")

    path = Path(model).expanduser()
    if path.is_dir():
        _check_model_folder(path)
        source, local_files_only = str(path), True
    elif path.suffix.lower() in (".ckpt", ".safetensors", ".pt", ".bin") or path.exists():
        raise ValueError(
            f"model '{model}' is a single file; edtools loads diffusers folders. Convert it with diffusers' "
            "scripts/convert_original_stable_diffusion_to_diffusers.py and point `model` at the output folder"
        )
    elif model.count("/") != 1 or model.startswith(("/", ".", "~")):
        raise ValueError(
            f"model '{model}' is neither an existing folder nor a hub id like 'owner/name'; "
            "check the path (it must be a diffusers Stable Diffusion folder)"
        )
    else:
        source = model
    dtype = torch.float32 if dtype is None else dtype
    hub = {} if local_files_only is None else {"local_files_only": bool(local_files_only)}
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", torch_dtype=dtype, **hub
        )
        vae = diffusers.AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **hub)
        text_encoder = transformers.CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", dtype=dtype, **hub
        )
        tokenizer = transformers.CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub)
        noise_scheduler = diffusers.DDPMScheduler.from_pretrained(source, subfolder="scheduler", **hub)
    except OSError as exc:
        if path.is_dir():
            hint = "the folder is incomplete or damaged; re-save or re-download it"
        else:
            hint = (
                f"there is no folder '{model}' here, so it was read as a hub id: check the name, your network "
                "and the Hugging Face cache (with HF_HUB_OFFLINE=1 only the cache is read)"
            )
        raise OSError(
            f"could not load Stable Diffusion model '{model}': {str(exc).rstrip('.')}. {hint}"
        ) from exc
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"model '{model}' has scheduler prediction_type '{prediction_type}'; "
            f"edtools trains {' or '.join(PREDICTION_TYPES)}"
        )
    return SDComponents(unet, text_encoder, tokenizer, vae, noise_scheduler)


# ---------------------------------------------------------------------------------------------------------
# Saving and sampling


def make_pipeline(components: SDComponents, *, device: str | torch.device | None = None) -> Any:
    """A StableDiffusionPipeline sharing the training modules (no copies), with a DDIM sampler built from
    the noise scheduler's config (same betas and prediction type; good images in few steps)."""
    diffusers = _require("diffusers")
    pipeline = diffusers.StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        # set_alpha_to_one=False is SD's own sampler setting; a value in the config wins.
        scheduler=diffusers.DDIMScheduler.from_config(
            {"set_alpha_to_one": False, **components.noise_scheduler.config}
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    if device is not None:
        pipeline.to(device)
    return pipeline


def save_components(components: SDComponents, out_dir: str | os.PathLike) -> Path:
    """Write a complete diffusers pipeline folder (safetensors) that StableDiffusionPipeline.from_pretrained
    and load_components read. Written into a temp folder beside out_dir and renamed at the end, so out_dir
    is either the old complete folder or the new complete one, never half written."""
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline = make_pipeline(components)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = None
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists() and (old / out.name).exists():
            os.replace(old / out.name, out)  # put the previous checkpoint back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------------
# A tiny SD-shaped model (tests, demo): real classes and file layout, a few hundred thousand weights.

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


def _tiny_tokenizer(folder: Path):
    """A CLIPTokenizer from generated vocab.json / merges.txt files (model_max_length 77, like SD)."""
    transformers = _require("transformers")
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
    torch = _require("torch")
    diffusers = _require("diffusers")
    transformers = _require("transformers")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type is '{prediction_type}'; allowed: {', '.join(PREDICTION_TYPES)}")
    if sample_size < 1:
        raise ValueError(f"sample_size (latent side) must be >= 1, got {sample_size}")

    with tempfile.TemporaryDirectory(prefix="edtools-tokenizer-") as tmp:
        tokenizer = _tiny_tokenizer(Path(tmp))
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
