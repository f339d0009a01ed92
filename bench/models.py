"""The benchmarks' models: real SD1.5 / SDXL (bench/configs.py) on the meta device, or random weights on a device.

bench/memory.py counts bytes on meta-device models; bench/gpu_step.py and bench/host_memory.py build real ones.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from configs import ARCHITECTURES, SD_NOISE_SCHEDULER  # bench/ is on sys.path when a script runs

__all__ = [
    "ARCHS",
    "ARCH_LABEL",
    "LORA_TARGETS",
    "TEXT_TOKENS",
    "Arch",
    "build_components",
    "build_text",
    "build_unet",
    "build_vae",
    "default_dtype",
    "module_dtype",
    "part_dtypes",
    "smoke_architecture",
    "tokenizers_for",
]

TEXT_TOKENS = 77
# peft LoRA on the UNet as kohya targets it: attention projections, proj_in/proj_out and the feed-forward.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@dataclass(frozen=True)
class Arch:
    unet: dict
    vae: dict
    texts: tuple  # (name, config, with_projection)
    vae_fp32: bool  # the VAE config has force_upcast: it runs in fp32
    penultimate_hidden: bool = False  # the UNet reads the text encoders' second-to-last hidden states
    added_conditioning: bool = False  # pooled text embeddings and size/crop time ids go in beside the text


ARCHS = {
    "sd": Arch(ARCHITECTURES["sd"]["unet"], ARCHITECTURES["sd"]["vae"], ARCHITECTURES["sd"]["texts"], False),
    "sdxl": Arch(
        ARCHITECTURES["sdxl"]["unet"],
        ARCHITECTURES["sdxl"]["vae"],
        ARCHITECTURES["sdxl"]["texts"],
        True,
        penultimate_hidden=True,
        added_conditioning=True,
    ),
}
ARCH_LABEL = {"sd": "SD1.5", "sdxl": "SDXL"}

# ---------------------------------------------------------------------------------------------------------------
# On the meta device: shapes and dtypes, no weights (bench/memory.py).
# ---------------------------------------------------------------------------------------------------------------


def build_unet(arch: str, lora_rank: int = 0, lora_alpha: float | None = None):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHS[arch].unet)
        if lora_rank:
            from peft import LoraConfig

            unet.requires_grad_(False)
            unet.add_adapter(
                LoraConfig(
                    r=lora_rank,
                    lora_alpha=lora_alpha or lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=LORA_TARGETS,
                )
            )
    return unet


def build_text(config: dict, with_projection: bool):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**config)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def build_vae(arch: str):
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(**ARCHS[arch].vae)


# ---------------------------------------------------------------------------------------------------------------
# Random weights on a device, each part in the dtype edtools keeps it in (bench/gpu_step.py, bench/host_memory.py).
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def smoke_architecture(architecture: str) -> tuple[dict, tuple]:
    """Tiny configs of an architecture (edtools.models.tiny_components, real block structure) and its tokenizers:
    the same build, setup and step as the real sizes, on the CPU in seconds."""
    from edtools.models import tiny_components
    from edtools.models.families import family

    tiny = tiny_components(family(architecture).variants[0], real_blocks=True, sample_size=16)

    def diffusers_config(module) -> dict:
        return {k: v for k, v in module.config.items() if not k.startswith("_")}

    def text_config(encoder) -> dict:
        values = encoder.config.to_dict()
        for key in (
            "dtype",
            "torch_dtype",
            "_name_or_path",
            "architectures",
            "transformers_version",
            "model_type",
        ):
            values.pop(key, None)
        return values

    texts = [("text_encoder", text_config(tiny.text_encoder), False)]
    if tiny.text_encoder_2 is not None:
        texts.append(("text_encoder_2", text_config(tiny.text_encoder_2), True))
    configs = {"unet": diffusers_config(tiny.unet), "vae": diffusers_config(tiny.vae), "texts": tuple(texts)}
    return configs, tiny.tokenizers


def tokenizers_for(architecture: str) -> tuple:
    """CLIP tokenizers with a generated vocabulary (nothing to download): every caption is padded or cut to 77
    tokens as by the real ones, so the text encoders do the same work."""
    from edtools.models import tiny_tokenizer
    from edtools.models.families import family

    with tempfile.TemporaryDirectory(prefix="gpu-step-tokenizer-") as tmp:
        first = tiny_tokenizer(Path(tmp) / "1")
        second = (
            tiny_tokenizer(Path(tmp) / "2", pad_token="!")
            if len(family(architecture).text_encoders) > 1
            else None
        )
    return (first,) if second is None else (first, second)


def part_dtypes(config, configs: dict) -> dict:
    """The dtype each part is built in: the one edtools.train.step.prepare_modules keeps it in (trained weights
    float32, frozen ones in the mixed-precision dtype, a VAE with force_upcast float32), so prepare_modules casts
    nothing. run_preset checks that it did not."""
    import inspect

    import torch
    from diffusers import AutoencoderKL

    from edtools.train.step import weight_dtype

    frozen = weight_dtype(config)
    lora = config.lora_rank > 0
    upcast_default = inspect.signature(AutoencoderKL.__init__).parameters["force_upcast"].default
    trained = {"text_encoder": config.train_text_encoder, "text_encoder_2": bool(config.train_text_encoder_2)}
    dtypes = {
        "unet": frozen if lora else torch.float32,
        "vae": torch.float32 if configs["vae"].get("force_upcast", upcast_default) else frozen,
    }
    for name, _, _ in configs["texts"]:
        dtypes[name] = torch.float32 if trained[name] and not lora else frozen
    return dtypes


def build_components(configs: dict, tokenizers: tuple, dtypes: dict, device, seed: int = 0):
    """SDComponents of random weights made on `device` in `dtypes`: every parameter is created (and initialised by
    the module's own init) once, where and as it will stay."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from edtools.models import SDComponents

    torch.manual_seed(seed)
    with torch.device(device):
        with default_dtype(dtypes["unet"]):
            unet = UNet2DConditionModel(**configs["unet"])
        with default_dtype(dtypes["vae"]):
            vae = AutoencoderKL(**configs["vae"])
        encoders = {}
        for name, config, projection in configs["texts"]:
            model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
            with default_dtype(dtypes[name]):
                encoders[name] = model_class(CLIPTextConfig(**config))
    for module in (unet, vae, *encoders.values()):
        module.eval()  # as from_pretrained returns them
    return SDComponents(
        unet,
        encoders["text_encoder"],
        tokenizers[0],
        vae,
        DDPMScheduler(**SD_NOISE_SCHEDULER),
        text_encoder_2=encoders.get("text_encoder_2"),
        tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None,
    )


def module_dtype(module):
    """The dtype of a module's own (base) weights, LoRA adapters left out."""
    return next(p.dtype for n, p in module.named_parameters() if "lora_" not in n)
