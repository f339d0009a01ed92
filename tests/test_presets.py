"""Presets fill the settings a user leaves out; device defaults (precision, checkpointing, resolution) follow the
model and the GPU; the notebook's choice of preset follows the GPU's memory."""

from __future__ import annotations

import argparse
import dataclasses
import os

import pytest

from edtools.config import ConfigError, TrainConfig
from edtools.flags import add_arguments, from_args
from edtools.models.families import family_names
from edtools.presets import PRESETS, auto_settings, choose_preset

REQUIRED = {"data_root": "data", "model": "model", "out": "out"}
NATIVE_RESOLUTION = {"sd": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}
# the Flux family comes from another branch: its presets are defined here, chosen once it is registered
needs_flux = pytest.mark.skipif("flux" not in family_names(), reason="the flux family is not registered yet")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_config_for_its_architecture(name):
    preset = PRESETS[name]
    config = TrainConfig.from_dict({**REQUIRED, "preset": name})
    for key, value in preset.settings.items():
        assert getattr(config, key) == value, key
    assert config.preset == name
    assert config.resolution == NATIVE_RESOLUTION[preset.architecture]
    if preset.gpu_gib <= 16:  # T4: no bfloat16
        assert config.mixed_precision == "fp16" and config.gradient_checkpointing
        assert not preset.needs_bf16
    if preset.needs_bf16:
        assert config.mixed_precision == "bf16"
    assert preset.runtime and f"{preset.gpu_gib:.0f} GB" in preset.runtime
    assert preset.estimated_gib[0] > 0  # bench/memory.py or bench/memory_flow.py estimated it
    assert config.cache_latents == "memory"
    assert (config.lora_rank > 0) == ("lora" in name)


def test_own_settings_win_over_the_preset_from_a_file_and_from_flags(tmp_path):
    config = TrainConfig.from_dict({**REQUIRED, "preset": "sdxl-lora-t4", "batch_size": 2})
    assert config.batch_size == 2 and config.lora_rank == 16 and config.resolution == 1024
    parser = add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--lora-rank", "8", "--preset", "sd15-lora-t4"])
    config = from_args(args, base={**REQUIRED, "resolution": 768})
    assert (config.lora_rank, config.resolution, config.batch_size) == (8, 768, 4)
    # the config written to a checkpoint reads back equal: every value is explicit there
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_unknown_preset_is_an_error_naming_the_known_ones():
    with pytest.raises(ConfigError, match=r"preset is 'sdxl-t4'; known presets: sd15-full-t4, sd15-lora-t4"):
        TrainConfig.from_dict({**REQUIRED, "preset": "sdxl-t4"})


@pytest.mark.parametrize(
    ("architecture", "gib", "lora", "expected"),
    [
        ("sd", 15.0, None, "sd15-full-t4"),
        ("sd", 15.0, True, "sd15-lora-t4"),
        ("sdxl", 15.0, None, "sdxl-lora-t4"),
        ("sd", 24.0, None, "sd15-full-24gb"),
        ("sd", 40.0, True, "sd15-lora-t4"),
        ("sdxl", 22.5, None, "sdxl-lora-24gb"),  # an A10G or L4: SDXL full needs more (bench/memory.py)
        ("sdxl", 24.0, True, "sdxl-lora-24gb"),
        ("sdxl", 39.4, None, "sdxl-full-40gb"),  # an A100 40 GB
        ("sdxl", 80.0, True, "sdxl-lora-24gb"),
    ],
)
def test_choose_preset_by_gpu_memory(architecture, gib, lora, expected):
    preset, why = choose_preset(architecture, gib, lora=lora)
    assert preset.name == expected
    assert why.startswith(f"{expected}: the GPU has {gib:.0f} GB")


@pytest.mark.parametrize(
    ("gib", "bf16", "expected"),
    [(15.0, False, "sd35m-lora-t4"), (15.0, None, "sd35m-lora-t4"), (22.5, True, "sd35m-lora-t4")],
)
def test_sd35_medium_lora_fits_a_t4(gib, bf16, expected):
    preset, why = choose_preset("sd3", gib, bf16=bf16)
    assert preset.name == expected
    assert why.startswith(f"sd35m-lora-t4: the GPU has {gib:.0f} GB. SD3.5 Medium LoRA")
    assert "it fits a free Colab T4" in why
    config = TrainConfig.from_dict({**REQUIRED, "preset": preset.name})
    assert (config.mixed_precision, config.quantize_base, config.lora_rank) == ("fp16", "none", 16)
    assert config.cache_latents == "memory" and config.cache_text_embeddings and config.gradient_checkpointing
    assert preset.estimated_gib[0] <= 0.85 * 14.75  # bench/memory_flow.py: fits a T4's usable memory


def test_flux_presets_are_qlora_on_24gb_and_bf16_lora_on_40gb():
    small, big = PRESETS["flux-lora-24gb"], PRESETS["flux-lora-40gb"]
    assert small.settings["quantize_base"] == "nf4" and big.settings.get("quantize_base", "none") == "none"
    for preset in (small, big):
        config = TrainConfig.from_dict({**REQUIRED, "preset": preset.name})
        assert config.mixed_precision == "bf16" and config.lora_rank == 16 and preset.needs_bf16
        assert config.cache_latents == "memory" and config.cache_text_embeddings
    # (estimated step peak, GPU) of bench/memory_flow.py: each within its GPU's usable memory
    assert small.estimated_gib[0] <= 0.85 * 22.0 and big.estimated_gib[0] <= 0.85 * 40 * 0.92


@needs_flux
@pytest.mark.parametrize(
    ("gib", "bf16", "expected"),
    [
        (22.0, True, "flux-lora-24gb"),
        (23.6, None, "flux-lora-24gb"),
        (39.4, True, "flux-lora-40gb"),
        (80.0, True, "flux-lora-40gb"),
    ],
)
def test_choose_flux_preset_by_gpu(gib, bf16, expected):
    preset, why = choose_preset("flux", gib, bf16=bf16)
    assert preset.name == expected and why.startswith(f"{expected}: the GPU has {gib:.0f} GB")


@needs_flux
@pytest.mark.parametrize("bf16", [False, None])
def test_flux_on_a_t4_names_the_runtime_it_needs(bf16):
    preset, why = choose_preset("flux", 15.0, bf16=bf16)
    assert preset is None
    assert "needs bf16, which this GPU (15 GB) lacks: choose an L4 (24 GB) or an A100 (40 GB) runtime" in why
    # a GPU with bf16 but too small for either
    preset, why = choose_preset("flux", 16.0, bf16=True)
    assert preset is None and why.endswith("flux-lora-24gb needs an L4 (24 GB) runtime")


def test_choose_preset_without_a_gpu_or_sdxl_full_on_a_t4():
    assert choose_preset("sd", None) == (None, choose_preset("sdxl", None)[1])
    preset, why = choose_preset("sdxl", 15.0, lora=False)
    assert (preset, why) == (None, "no SDXL full fine-tune preset fits a GPU of 15 GB: choose sdxl-lora-t4")
    assert choose_preset("sd", 8.0)[0] is None  # smaller than any preset's GPU


def auto(config, **overrides):
    values = dict(
        architecture="sd", native_resolution=512, device_type="cuda", bf16_supported=True, gpu_gib=80.0
    )
    return auto_settings(config, **{**values, **overrides})


def test_auto_settings_by_device_and_model():
    config = TrainConfig(**REQUIRED)
    on_t4 = auto(config, bf16_supported=False, gpu_gib=15.0)
    assert (on_t4.mixed_precision, on_t4.gradient_checkpointing, on_t4.resolution) == ("fp16", True, 512)
    big = auto(config)
    assert (big.mixed_precision, big.gradient_checkpointing) == ("bf16", False)
    cpu = auto(config, device_type="cpu", gpu_gib=None)
    assert (cpu.mixed_precision, cpu.gradient_checkpointing) == ("no", False)
    sdxl = auto(config, architecture="sdxl", native_resolution=1024)
    assert (sdxl.gradient_checkpointing, sdxl.resolution, sdxl.train_text_encoder_2) == (True, 1024, True)
    lora_on_t4 = auto(dataclasses.replace(config, lora_rank=8), bf16_supported=False, gpu_gib=15.0)
    assert lora_on_t4.gradient_checkpointing is False
    assert auto(config).train_text_encoder_2 is False  # SD 1.x/2.x have no second encoder
    # one decoding worker beside a GPU (Colab has 2 CPUs); on the CPU the trainer needs every core
    assert (big.num_workers, cpu.num_workers) == (1 if os.cpu_count() >= 2 else 0, 0)


def test_auto_settings_keep_what_the_user_chose():
    config = TrainConfig(
        **REQUIRED,
        resolution=768,
        mixed_precision="no",
        gradient_checkpointing=False,
        train_text_encoder_2=False,
        num_workers=3,
    )
    assert auto(config, architecture="sdxl", native_resolution=1024, gpu_gib=15.0) == config
