"""QLoRA: the frozen denoiser of a transformer family loaded in 4-bit NF4 (bitsandbytes) under LoRA adapters.

diffusers quantises it while loading (its BitsAndBytesConfig), from a folder's shards or a single file's
memory-mapped tensors, each weight as it is placed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ModelError, require

if TYPE_CHECKING:
    import torch

    from .families import Family

__all__ = [
    "QUANTIZE_BASE",
    "T5_SETTINGS",
    "check_quantizable",
    "check_quantization",
    "check_t5_quantization",
    "cuda_present",
    "is_quantized",
    "quantize_loaded",
    "quantized_loading",
    "t5_8bit_loading",
]

# TrainConfig.t5's values: a T5 text encoder loaded as it is, in 8-bit (bitsandbytes' LLM.int8), or not at all
T5_SETTINGS = ("load", "8bit", "drop")

# quantize_base's values: "none" keeps the frozen denoiser in the mixed-precision dtype, "nf4" in 4-bit NormalFloat
# with a compute dtype of the mixed precision (the QLoRA paper's data type; bitsandbytes' double quantisation of
# the block scales too, as diffusers' Flux QLoRA example does)
QUANTIZE_BASE = ("none", "nf4")


def _config(kind: str, compute_dtype: torch.dtype) -> Any:
    diffusers = require("diffusers", feature="quantize_base nf4 (QLoRA)")
    if not hasattr(diffusers, "BitsAndBytesConfig"):  # diffusers' quantisers arrived in 0.31
        raise ModelError(
            f"quantize_base {kind} needs diffusers 0.31 or newer (this one is {diffusers.__version__}, which "
            "cannot load a model quantised): upgrade diffusers, or set quantize_base none"
        )
    require("bitsandbytes", feature="quantize_base nf4 (QLoRA)")
    return diffusers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def check_quantizable(family: Family, kind: str, model: str) -> None:
    """A quantised base is for the families that say they can be (their transformer's Linear layers)."""
    if kind == "none" or family.quantizable:
        return
    from .families import FAMILIES

    which = ", ".join(f.label for f in FAMILIES if f.quantizable)
    raise ModelError(
        f"quantize_base is '{kind}', but '{model}' is a {family.label} model, whose {family.denoiser_part} "
        f"edtools does not quantise; QLoRA is for the transformer families ({which}): set quantize_base none"
    )


def check_quantization(kind: str, compute_dtype: torch.dtype) -> None:
    """Fail before anything is loaded when this machine cannot quantise: diffusers' own check of the
    environment (a GPU, accelerate, bitsandbytes), asked with the config the load will use."""
    if kind == "none":
        return
    config = _config(kind, compute_dtype)
    quantizers = require("diffusers.quantizers")
    try:
        quantizers.DiffusersAutoQuantizer.from_config(config).validate_environment()
    except RuntimeError as exc:  # diffusers: "No GPU found. A GPU is needed for quantization."
        raise ConfigError(
            f"quantize_base is '{kind}': QLoRA needs a CUDA GPU (bitsandbytes quantises the frozen model on it), "
            f"and diffusers found none ({exc}). Choose a GPU runtime, or set quantize_base none"
        ) from None
    except ImportError as exc:
        raise ConfigError(f"quantize_base is '{kind}': {exc}") from None


def quantized_loading(kind: str, compute_dtype: torch.dtype, device: Any) -> dict[str, Any]:
    """from_pretrained's keyword arguments that load the denoiser quantised straight onto `device` (its
    quantization_config and a device_map of the whole model; None: the CPU)."""
    if kind == "none":
        return {}
    return {
        "quantization_config": _config(kind, compute_dtype),
        "device_map": {"": str(device) if device is not None else "cpu"},
    }


def quantize_loaded(model: Any, kind: str, compute_dtype: torch.dtype, device: Any) -> Any:
    """The same diffusers model with its Linear weights quantised, weight by weight onto `device` (None: the CPU), by
    the quantiser from_pretrained uses (diffusers' single-file reader quantises only files saved quantised). For a
    denoiser read from a single file: its tensors, memory-mapped from the file, are read one at a time, so host
    memory holds no second copy of it; the caller lets the unquantised model go."""
    accelerate = require("accelerate", feature="quantize_base nf4 (QLoRA)")
    quantizers = require("diffusers.quantizers", feature="quantize_base nf4 (QLoRA)")
    loading = require("diffusers.models.model_loading_utils", feature="quantize_base nf4 (QLoRA)")
    quantizer = quantizers.DiffusersAutoQuantizer.from_config(
        _config(kind, compute_dtype), pre_quantized=False
    )
    quantizer.validate_environment()
    cls = type(model)
    with accelerate.init_empty_weights():
        quantized = cls.from_config(model.config)
    weights = model.state_dict()
    # as from_pretrained: modules the model keeps in float32 stay unquantised and in float32
    keep_in_fp32 = (
        list(cls._keep_in_fp32_modules or []) if hasattr(quantizer, "use_keep_in_fp32_modules") else []
    )
    quantizer.preprocess_model(
        model=quantized, device_map=None, state_dict=weights, keep_in_fp32_modules=keep_in_fp32
    )
    loading.load_model_dict_into_meta(
        quantized,
        weights,
        dtype=compute_dtype,
        hf_quantizer=quantizer,
        keep_in_fp32_modules=keep_in_fp32,
        device_map={"": str(device) if device is not None else "cpu"},
    )
    quantizer.postprocess_model(quantized)
    quantized.hf_quantizer = quantizer
    return quantized.eval()


def is_quantized(module: Any) -> bool:
    """Whether a diffusers model was loaded quantised (its hf_quantizer is set)."""
    return getattr(module, "hf_quantizer", None) is not None or bool(getattr(module, "is_quantized", False))


def cuda_present() -> bool:
    """Whether torch sees a CUDA GPU (the 8-bit T5 gate; tests lift it to run the real int8 load on the CPU)."""
    return bool(require("torch").cuda.is_available())


def check_t5_quantization(t5: str) -> None:
    """Fail before anything is loaded when t5 is "8bit" on a machine without a CUDA GPU: bitsandbytes' int8 layers
    are a GPU feature (transformers would load them on the CPU too, where they run slowly and untested)."""
    if t5 != "8bit":
        return
    require("bitsandbytes", feature="t5 8bit")
    require("transformers", feature="t5 8bit")
    if not cuda_present():
        raise ConfigError(
            "t5 is '8bit': the T5 encoder is loaded in 8-bit by bitsandbytes on a CUDA GPU, and torch sees none. "
            "Choose a GPU runtime, or set t5 load (or drop, for SD3)"
        )


def t5_8bit_loading(device: Any) -> dict[str, Any]:
    """from_pretrained's keyword arguments that load a T5 encoder in 8-bit (transformers' BitsAndBytesConfig)
    straight onto `device` (None: the CPU)."""
    transformers = require("transformers", feature="t5 8bit")
    require("bitsandbytes", feature="t5 8bit")
    return {
        "quantization_config": transformers.BitsAndBytesConfig(load_in_8bit=True),
        "device_map": {"": str(device) if device is not None else "cpu"},
    }
