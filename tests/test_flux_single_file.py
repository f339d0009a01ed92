"""Flux.1 single files: Black Forest Labs' transformer-only file and ComfyUI's checkpoint layout, read by diffusers'
own reader, the parts a file lacks from model_config; edtools' writer agrees with ComfyUI's key map.

diffusers' Flux reader is fixed to the real transformer's width (3072), so the reading tests build a transformer
of that width with one block of each kind (530 M parameters, bf16) beside the tiny VAE and text encoders.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import train_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from flux_layout import original_state_dict as comfyui_layout  # noqa: E402

from edtools.errors import ModelError  # noqa: E402
from edtools.models import load_components, save_components, tiny_components  # noqa: E402
from edtools.models.families import detect_variant  # noqa: E402
from edtools.models.single_file_layout import original_state_dict, save_single_file  # noqa: E402
from edtools.train import train  # noqa: E402

# FLUX.1's widths (24 heads of 128, rotary axes 16/56/56) with one double- and one single-stream block
_WIDE = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=128,
    num_attention_heads=24,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def wide_components():
    """Tiny Flux dev components with a transformer of the real width, its weights drawn from a seeded
    generator straight into bf16 (no float32 initialisation of 530 M weights)."""
    components = tiny_components("flux-dev")
    config = {**_WIDE, "joint_attention_dim": 32, "pooled_projection_dim": 32}
    with torch.device("meta"):
        transformer = diffusers.FluxTransformer2DModel(**config)
    transformer = transformer.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in transformer.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.bfloat16) * 0.02)
    return dataclasses.replace(components, unet=transformer.eval())


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    """(a diffusers folder of the wide model, Black Forest Labs' transformer-only file of it)."""
    root = tmp_path_factory.mktemp("flux-wide")
    components = wide_components()
    folder = save_components(components, root / "folder")
    from safetensors.torch import save_file

    bfl = root / "flux1-dev.safetensors"
    save_file(comfyui_layout(components.unet), str(bfl))  # bare keys, as BFL publishes them
    yield folder, bfl
    shutil.rmtree(root)  # 2 GB; the suite's disk use stays flat


def assert_same_parts(a, b) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_edtools_writes_the_layout_comfyui_maps():
    components = tiny_components("flux-dev", real_blocks=True)
    written = original_state_dict(components)
    transformer = {k: v for k, v in written.items() if k.startswith("model.diffusion_model.")}
    theirs = comfyui_layout(components.unet, "model.diffusion_model.")
    assert transformer.keys() == theirs.keys()
    assert all(torch.equal(transformer[k], theirs[k]) for k in theirs)
    assert {k.split(".")[0] for k in written} == {"model", "first_stage_model", "text_encoders"}
    assert not any(k.startswith("text_encoders.t5xxl.") for k in written)  # T5 is frozen: not written
    assert detect_variant(written) == "flux-dev"
    bare = comfyui_layout(tiny_components("flux-schnell").unet)
    assert detect_variant(bare) == "flux-schnell"


def test_a_transformer_only_file_without_model_config_says_to_set_it(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "flux1-schnell.safetensors"
    save_file(comfyui_layout(tiny_components("flux-schnell").unet), str(path))
    with pytest.raises(ModelError, match=r"without VAE .* Set --model-config .*black-forest-labs/FLUX.1-dev"):
        load_components(str(path))


@pytest.mark.slow
def test_a_bfl_file_loads_and_trains_like_its_folder(wide, tree, tmp_path):
    """Every part loaded from the file equals the folder's, bit for bit (training is a function of them and the
    seed); and a run from the file, its other parts from model_config, trains and writes its LoRA."""
    folder, bfl = wide
    from_file = load_components(str(bfl), model_config=str(folder))
    assert_same_parts(from_file, load_components(str(folder)))
    del from_file
    config = train_config(
        tree({"a": 2, "b": 2}),
        bfl,
        tmp_path / "out",
        epochs=1,
        max_steps=1,
        lora_rank=2,
        model_config=str(folder),
    )
    result = train(config)
    assert result.global_step == 1 and (Path(result.checkpoint) / "lora.safetensors").is_file()


@pytest.mark.slow
def test_edtools_checkpoint_file_is_read_back_equal_and_with_t5_needs_only_configs(wide, tmp_path):
    """edtools' checkpoint file (transformer, VAE, CLIP-L) reads back equal; with T5 added, as ComfyUI's
    all-in-one Flux files hold it, every part comes from the file and model_config needs no weights."""
    from safetensors.torch import save_file

    from edtools.models.single_file import read_state_dict

    folder, _ = wide
    components = load_components(str(folder))
    path = save_single_file(components, tmp_path / "flux-checkpoint.safetensors", dtype="fp32")
    assert_same_parts(load_components(str(path), model_config=str(folder)), components)
    # the transformer in bf16, as the wide model holds it (half the disk), the small parts in float32
    state = {
        k: v.to(torch.bfloat16) if k.startswith("model.diffusion_model.") else v.clone()
        for k, v in read_state_dict(path)[0].items()
    }
    path.unlink()
    t5 = components.text_encoder_2.state_dict()
    state.update(
        {f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5.items() if "embed_tokens" not in k}
    )
    all_in_one = tmp_path / "flux1-dev-all-in-one.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(all_in_one))
    del state
    configs = shutil.copytree(folder, tmp_path / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    assert_same_parts(load_components(str(all_in_one), model_config=str(configs)), components)


@pytest.mark.slow
def test_a_bfl_file_under_nf4_is_quantised_as_its_folder_is(wide, cpu_quantization):
    """QLoRA (flux-lora-24gb) from the file people download: the transformer's NF4 weights and block scales equal
    those quantised from the folder, bit for bit, and no bf16 copy of it is made on the way."""
    import bitsandbytes as bnb

    from edtools.models import Keep
    from edtools.train.host_memory import PeakHostMemory, current_host_memory

    folder, bfl = wide
    keep = Keep(torch.bfloat16, quantize="nf4")
    before = current_host_memory()
    with PeakHostMemory() as peak:
        from_file = load_components(str(bfl), model_config=str(folder), keep=keep).unet
    # Linux says how much the process allocated: the file's bf16 tensors were quantised, never copied first
    if before.anonymous is not None:
        from safetensors import safe_open

        with safe_open(str(bfl), "pt") as file:
            bf16_bytes = sum(2 * math.prod(file.get_slice(k).get_shape()) for k in file.keys())
        # measured 1.2x: the NF4 weights (0.36x) and the transient of the largest weights as they are quantised
        # (a fixed ~0.5 GB at Flux's real width); a bf16 copy first would add 1x more
        assert peak.result.anonymous - before.anonymous < 1.5 * bf16_bytes
    from_folder = load_components(str(folder), keep=keep).unet
    quantized = {n: m for n, m in from_file.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    linears = {n for n, m in from_file.named_modules() if isinstance(m, torch.nn.Linear)}
    assert quantized and set(quantized) == linears
    theirs = dict(from_folder.named_modules())
    for name, module in quantized.items():
        other = theirs[name]
        assert module.weight.quant_state.quant_type == "nf4"
        assert torch.equal(module.weight.data, other.weight.data), name
        assert torch.equal(module.weight.quant_state.absmax, other.weight.quant_state.absmax), name
    # training is a function of these weights and the seed: a QLoRA run from the file is the folder's run
    # (tests/test_qlora.py trains one)
