"""The parts of a loaded model (SDComponents), how each part is kept (Keep), and what the text encoders give.

Plain containers shared by the loaders and writers. Model families never import this module: they work on any
object with these parts (families.base.Parts), so imports go one way, components -> families.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ModelError, require

if TYPE_CHECKING:
    import torch

__all__ = [
    "FLOW_MATCHING",
    "PREDICTION_TYPES",
    "Keep",
    "SDComponents",
    "check_prediction_type",
    "quiet_progress",
    "unwrap",
    "vae_force_upcast",
]

PREDICTION_TYPES = ("epsilon", "v_prediction")
# What a flow-matching model (SD3's FlowMatchEulerDiscreteScheduler, which has no prediction_type) learns:
# the velocity noise - latents.
FLOW_MATCHING = "flow_matching"


@dataclass
class SDComponents:
    """The parts training touches. noise_scheduler is a DDPMScheduler built from the model's own scheduler
    config, so betas and prediction_type ("epsilon" / "v_prediction") are the model's. SDXL models have a
    second text encoder (CLIPTextModelWithProjection, whose pooled output conditions the UNet) and tokenizer; SD3
    may have a third (T5-XXL). A part the model lacks, or that was freed after caching the captions, is None."""

    unet: Any  # the denoiser: diffusers UNet2DConditionModel, SD3Transformer2DModel (its family's denoiser_class)
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    vae: Any  # diffusers AutoencoderKL
    noise_scheduler: Any  # diffusers DDPMScheduler (SD3: FlowMatchEulerDiscreteScheduler)
    text_encoder_2: Any = None  # SDXL, SD3: CLIPTextModelWithProjection; Flux: T5EncoderModel
    tokenizer_2: Any = None
    text_encoder_3: Any = None  # SD3's T5EncoderModel, when loaded
    tokenizer_3: Any = None

    @property
    def architecture(self) -> str:
        """The model family's name: "sdxl" (two text encoders, size and crop conditioning) or "sd" (SD 1.x /
        2.x). models.families.family_of(components) gives the family itself."""
        from .families import family_of

        return family_of(self).name

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.get("prediction_type", FLOW_MATCHING)

    @property
    def text_encoders(self) -> tuple[Any, ...]:
        """Every text encoder present, in order (text_encoder, text_encoder_2, text_encoder_3)."""
        encoders = (self.text_encoder, self.text_encoder_2, self.text_encoder_3)
        return tuple(e for e in encoders if e is not None)

    @property
    def tokenizers(self) -> tuple[Any, ...]:
        """Every tokenizer present, in order: input_ids, input_ids_2, input_ids_3 of a batch."""
        return tuple(t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None)


@dataclass(frozen=True)
class Keep:
    """How each part is kept, so that it is loaded that way and never through a float32 copy: frozen parts in
    `dtype` (None: float32), the parts named in `float32` (those that train fully) in float32, a VAE whose
    config asks for float32 (SDXL's force_upcast) in float32; each moved to `device` (a GPU) as soon as it is
    loaded, so that host memory holds one part at a time. quantize: the frozen denoiser's quantisation under
    LoRA (models.quantize: "nf4" loads it in 4-bit, computing in `dtype`), "none" for none. t5: how a T5 text
    encoder is loaded (TrainConfig.t5): "load" in `dtype`, "8bit" quantised by bitsandbytes (LLM.int8, straight
    onto `device`), "drop" not at all (a family that can condition without it)."""

    dtype: Any = None  # torch.float16 / torch.bfloat16 / None
    float32: frozenset[str] = frozenset()  # of "unet", "text_encoder", "text_encoder_2"
    device: Any = None
    quantize: str = "none"
    t5: str = "load"
    # parts loaded but left on the CPU, for the run to place later: a run that caches its captions places the
    # (unquantised) denoiser only after the text encoders encoded them and T5 was freed, so the two never share
    # the GPU
    later: frozenset[str] = frozenset()

    def dtype_of(self, part: str, *, force_upcast: bool = False) -> torch.dtype:
        torch = require("torch")
        if self.dtype is None or part in self.float32 or (part == "vae" and force_upcast):
            return torch.float32
        return self.dtype

    def place(self, module: Any, part: str | None = None) -> Any:
        torch = require("torch")
        if part in self.later:
            return module
        if self.device is not None and torch.device(self.device).type != "cpu":
            torch.nn.Module.to(module, self.device)  # torch's own: diffusers' override warns on every move
        return module


@contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' per-model "Loading weights" / "Writing model shards" bars off for a block (downloads keep
    theirs: those are huggingface_hub's)."""
    logging = require("transformers.utils.logging")
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def vae_force_upcast(source: str, hub: dict) -> bool:
    """Whether the VAE config of a diffusers folder or hub id asks to run in float32 (SDXL's)."""
    diffusers = require("diffusers")
    return bool(
        diffusers.AutoencoderKL.load_config(source, subfolder="vae", **hub).get("force_upcast", False)
    )


def check_prediction_type(components: SDComponents, model: str) -> None:
    prediction_type = components.prediction_type
    if prediction_type not in PREDICTION_TYPES and prediction_type != FLOW_MATCHING:
        raise ModelError(
            f"model '{model}' has scheduler prediction_type '{prediction_type}'; "
            f"edtools trains {' or '.join(PREDICTION_TYPES)}"
        )


def unwrap(module: Any) -> Any:
    """The model inside torch.compile / DistributedDataParallel wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif type(module).__name__ in ("DistributedDataParallel", "DataParallel"):
            module = module.module
        else:
            return module
